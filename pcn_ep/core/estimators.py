"""Gradient estimators with one interface: ``estimator(network, x, y) -> Estimate``.

``Estimate.surrogate`` is a scalar whose gradient w.r.t. the network's parameters *is* the estimate:
the mean cost for backprop; for EP, the linear form Σ_θ ⟨g_θ, θ⟩ with g_θ computed from detached
nudged states. Calling ``backward`` (or Lightning's ``manual_backward``) on it goes through autograd,
so DDP's gradient all-reduce, gradient clipping and optimizers work unchanged. Gradients are means
over the local batch, so DDP's averaging yields the mean over the global batch.

EP schemes (the paper's Sec. 3.1) are one batched nudged phase in which every example carries its own β_i and
contributes (1/β_i) ∂F/∂θ(θ, β_i, h^{β_i}) / copies to the estimate (∂F/∂θ = 0 at the free state,
the paper's Eq. 11, so no free-phase term is needed):

    forward  β_i = +β                 backward β_i = −β
    random   β_i = ±β, sign drawn per example
    centered the batch twice, β_i = +β then −β, each copy weighted ½   (the paper's Eq. 7)
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .energy import Cost, get_cost
from .equilibrium import PERTURBATIONS, Dynamics, NudgedState, check_pool_routing, nudged_phase
from .layers import GenericLayer
from .networks import PCN

SCHEMES = ("forward", "backward", "random", "centered")


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite, with one device synchronization for all of them."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class DivergenceError(FloatingPointError):
    """A non-finite state or gradient; the message names the phase and the layer."""


@dataclass
class Estimate:
    """What one training step needs: the surrogate to backpropagate, and what to log.

    ``finite`` is a 0-dim bool tensor on the device, computed without a host sync: True iff the
    free loss, every nudged state, the nudged energies and every EP gradient estimate are finite (an
    energy or gradient that overflows counts as non-finite). For backprop it covers the loss only:
    its gradient exists after ``backward``. ``stats`` are tensors (no sync): see
    ``EquilibriumPropagation.statistics``.
    """

    surrogate: Tensor
    logits: Tensor  # free-phase output h_L* (the prediction)
    loss: Tensor  # mean cost at the free state
    finite: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    trace: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    betas: Tensor | None = None
    kinks: list[int] | None = None  # per hidden layer, only with ``count_kinks``


class Backprop:
    """Plain backprop of the mean cost through the same network (the paper's baseline).

    ``check_finite``: raise ``DivergenceError`` on a non-finite loss (one sync); with False the
    caller reads ``Estimate.finite``."""

    def __init__(self, cost: str = "ce", check_finite: bool = True) -> None:
        self.cost: Cost = get_cost(cost)
        self.check_finite = check_finite

    def predict(self, network: PCN, x: Tensor) -> Tensor:
        return network(x)

    def __call__(self, network: PCN, x: Tensor, y: Tensor) -> Estimate:
        return self.checked(self.estimate, network, x, y)

    def checked(self, estimate_fn: Callable[..., Estimate], network: PCN, x: Tensor, y: Tensor
                ) -> Estimate:
        estimate = estimate_fn(network, x, y)
        if self.check_finite and not bool(estimate.finite):
            raise DivergenceError(f"non-finite loss {estimate.loss.item()} at the free state "
                                  "(backprop)")
        return estimate

    def estimate(self, network: PCN, x: Tensor, y: Tensor) -> Estimate:
        """The estimate with no host sync (compilable with ``fullgraph=True``)."""
        logits = network(x)
        loss = self.cost.value(logits, y).mean()
        return Estimate(loss, logits.detach(), loss.detach(), torch.isfinite(loss.detach()))


class EquilibriumPropagation:
    """EP on a PCN: free phase (a forward pass), nudged phase(s), local weight gradients.

    Args:
        cost: ``"ce"`` or ``"mse"``.
        perturbation: ``"nudge"`` (βC added to the energy) or ``"clamp"`` (the paper's Eq. 8).
        scheme: ``forward``, ``backward``, ``random`` or ``centered``.
        beta: the nudging strength |β| > 0; the scheme chooses the signs.
        dynamics: K, rule, order and α of the nudged phase.
        trace: record per-iteration energies (the paper's Fig. 8); costs a full forward per iteration.
        generator: RNG for the random scheme's signs (default: torch's global RNG). The signs are
            drawn on the data's device, so the generator must live there (a CUDA generator for CUDA
            data): no host round trip.
        count_kinks: count the units that cross a ReLU/max-pool kink during the relaxation
            (``Estimate.kinks``; a diagnostic for gradcheck that syncs, not for training).
        interrupt: asked once per nudge iteration; True stops the phase with ``Interrupted``
            (the training module points it at its preemption flag). Not asked inside a compiled step.
        check_finite: True: one host sync per call, and ``DivergenceError`` naming the phase and
            the layer when ``Estimate.finite`` is False. False: no sync at all; the caller reads
            ``Estimate.finite`` when it likes and, if False, gets the message from ``diagnose``
            (the same batch and signs) or by calling again with True on the same batch.
        pool_routing: ``free`` (the free phase's winners kept through the nudged phase, as
            backprop's derivative does) or ``nudged`` (each window's max recomputed, as the energy
            says); they differ at exactly tied windows, see ``equilibrium``.
    """

    def __init__(
        self,
        cost: str = "ce",
        perturbation: str = "nudge",
        scheme: str = "centered",
        beta: float = 0.05,
        dynamics: Dynamics | None = None,
        trace: bool = False,
        generator: torch.Generator | None = None,
        count_kinks: bool = False,
        interrupt: Callable[[], bool] | None = None,
        check_finite: bool = True,
        pool_routing: str = "free",
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(
                f"unknown perturbation {perturbation!r}; choose one of {list(PERTURBATIONS)}"
            )
        if not beta > 0 or beta != beta:
            raise ValueError(
                f"beta must be > 0 for EP (the scheme sets its sign), got {beta!r}: "
                "the estimate divides by beta"
            )
        self.cost, self.perturbation, self.scheme, self.beta = get_cost(cost), perturbation, scheme, beta
        self.dynamics = dynamics or Dynamics()
        self.trace, self.generator, self.count_kinks = trace, generator, count_kinks
        self.interrupt, self.check_finite = interrupt, check_finite
        check_pool_routing(pool_routing)
        self.pool_routing = pool_routing

    def predict(self, network: PCN, x: Tensor) -> Tensor:
        """The prediction is the free state's output: a forward pass (the paper's Sec. 4)."""
        return network(x)

    def signed_betas(self, batch: int, device: torch.device) -> Tensor:
        """Per-example β_i for the stacked nudged batch (copy c of example i at c·batch + i)."""
        ones = torch.ones(batch, device=device, dtype=torch.float64)
        if self.scheme == "forward":
            return self.beta * ones
        if self.scheme == "backward":
            return -self.beta * ones
        if self.scheme == "random":
            signs = torch.randint(0, 2, (batch,), generator=self.generator, device=device)
            return self.beta * (2 * signs.to(torch.float64) - 1)
        return torch.cat([self.beta * ones, -self.beta * ones])

    def __call__(self, network: PCN, x: Tensor, y: Tensor) -> Estimate:
        return self.checked(self.estimate, network, x, y)

    def checked(self, estimate_fn: Callable[..., Estimate], network: PCN, x: Tensor, y: Tensor
                ) -> Estimate:
        """Draw the signs (outside any compiled region: a generator cannot be traced), estimate,
        and with ``check_finite`` raise on divergence."""
        estimate = estimate_fn(network, x, y, self.signed_betas(x.shape[0], x.device))
        if self.check_finite and not bool(estimate.finite):
            raise DivergenceError(self.diagnose(network, x, y, estimate))
        return estimate

    def diagnose(self, network: PCN, x: Tensor, y: Tensor, estimate: Estimate) -> str:
        """The message for an estimate whose ``finite`` is False: reruns it eagerly with its own
        signs (``estimate.betas``) and names the first non-finite loss, gradient or state."""
        record: dict = {}
        self.estimate(network, x, y, estimate.betas, record)
        return self._where(network, estimate, record)

    def estimate(self, network: PCN, x: Tensor, y: Tensor, betas: Tensor,
                 record: dict | None = None) -> Estimate:
        """The estimate for given signs: straight-line tensor code, no host sync (compilable with
        ``fullgraph=True``). ``record`` (diagnosis only) receives the gradients and per-layer state
        finiteness."""
        batch = x.shape[0]
        copies = betas.numel() // batch
        with torch.no_grad():
            free = network.free_phase(x)
            logits = free.a[-1]
            nudged = nudged_phase(network, free, y, betas, self.cost, self.dynamics,
                                  self.perturbation, self.trace, self.count_kinks, self.interrupt,
                                  self.pool_routing)
            c = self.cost.value(nudged.absolute(network.depth), y.repeat(copies))
            # −(1/β_i) / copies / batch: the mean over examples, and ∂F/∂θ's sign, in one factor.
            weights = (-1.0 / (betas * copies * batch)).to(logits.dtype).view(copies, batch)
            grads, e = self.parameter_gradients(network, nudged, weights, record)
            stats = self.statistics(e, c.view(copies, batch), betas.view(copies, batch))
        with torch.autocast(x.device.type, enabled=False):
            surrogate = sum(torch.dot(g.flatten().to(p.dtype), p.flatten())
                            for g, p in zip(grads, network.parameters()))
        loss = self.cost.value(logits, y).mean()
        stats["C_free"] = loss
        finite = torch.isfinite(loss + surrogate.detach() + e.sum() + c.sum())
        return Estimate(surrogate, logits, loss, finite, stats, nudged.trace, betas, nudged.kinks)

    def parameter_gradients(
        self, network: PCN, nudged: NudgedState, weights: Tensor, record: dict | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Σ_i w_i ∂F/∂θ at the nudged states, in ``network.parameters()`` order, and the
        per-example prediction-error energy E = ½ Σ_k ‖ε_k‖² (shape (copies, batch)).

        ∂F/∂θ_k = −(∂a_k/∂θ_k)^T (ε_k ⊙ f_k'(a_k)) (our derivation from the paper's Eq. 12):
        local, and zero for a layer whose error never became non-zero. All copies share one call per layer; a layer whose inputs
        never moved (layer 1) sums its copies first, since they share input and pool routing.
        Goes from the top down and drops each layer's tensors once used (the step's memory peak).
        """
        per_layer: dict[int, list[Tensor]] = {}
        e = torch.zeros_like(weights)
        shape = [*weights.shape]
        for k in sorted(nudged.error_layers, reverse=True):
            layer = network.layers[k - 1]
            grad_a, e_k = self._error(nudged, k)
            e = e + e_k
            grad_a = grad_a * weights.view(*shape, *([1] * (grad_a.dim() - 2)))
            fixed = nudged.delta_a[k] is None
            if fixed:  # fixed inputs and routing: sum the copies first
                grad_a, copies = grad_a.sum(0), 1
                inputs = [nudged.free_h(s) for s in network.sources(k)] + [None]
            else:
                grad_a, copies = nudged.flat(grad_a), nudged.copies
                inputs = [nudged.absolute(s) for s in network.sources(k)] + [None]
            if isinstance(layer, GenericLayer):  # a VJP of g_k at the nudged inputs
                per_layer[k] = layer.param_grads(inputs[:-1], grad_a, copies)
            else:
                if fixed:
                    indices = nudged.free_indices(k, 1) if layer.pool else None
                    shape_c = torch.Size((grad_a.shape[0], *nudged.shape_c(k)[1:]))
                else:
                    indices, shape_c = nudged.indices[k], nudged.shape_c(k)
                grad_c = layer.unpool(grad_a, indices, shape_c)
                per_layer[k] = layer.param_grads(inputs[0], inputs[1], grad_a, grad_c)
            if record is not None and nudged.delta[k] is not None:
                record.setdefault("states", {})[k] = bool(torch.isfinite(nudged.delta[k]).all())
                scale = nudged.free_h(k).abs().max().clamp_min(1e-12)
                record.setdefault("growth", {})[k] = float(nudged.delta[k].abs().max() / scale)
            # Every reader of h_k (above k) is done: drop what only layers ≥ k read.
            nudged.delta[k] = nudged.delta_a[k] = nudged.indices[k] = nudged.pullbacks[k] = None
            if k < network.depth:
                nudged.free.a[k] = nudged.free.d[k] = nudged.free.indices[k] = None
        grads = [g for k, layer in enumerate(network.layers, start=1)
                 for g in (per_layer[k] if k in per_layer
                           else [torch.zeros_like(p) for p in layer.parameters()])]
        if record is not None:
            record["grads"] = grads
        return grads, e

    @staticmethod
    def _error(nudged: NudgedState, k: int) -> tuple[Tensor, Tensor]:
        """(ε_k ⊙ f'(a_k), ½‖ε_k‖² per example); ε_k itself is freed on return."""
        eps, grad_a = nudged.error(k)
        return grad_a, 0.5 * eps.flatten(2).pow(2).sum(-1)

    def statistics(self, e: Tensor, c: Tensor, betas: Tensor) -> dict[str, Tensor]:
        """Per sign of β (mean over the examples nudged with that sign): ``E+``/``E-`` the
        prediction-error energy ½Σ‖ε_k‖², ``C+``/``C-`` the cost at the nudged output, and
        ``energy+``/``energy-`` F = E + βC; ``E_max`` the largest per-example E. ``C_free`` (the mean
        free cost, added by the caller) bounds a healthy nudge: E stays far below |β|·C_free.
        A sign the scheme never draws has no keys; a random-scheme sign absent from the batch is
        NaN. All tensors, no sync."""
        values = torch.stack([e + betas.to(e.dtype) * c, e, c]).flatten(1)  # F, E, C per example
        masks = torch.stack([betas > 0, betas < 0], -1).flatten(0, 1).to(e.dtype)
        means = (values @ masks) / masks.sum(0)  # (quantity, sign)
        stats = {"E_max": e.max()}
        for i, sign in enumerate("+-"):
            if sign in {"forward": "+", "backward": "-"}.get(self.scheme, "+-"):
                stats.update({f"{name}{sign}": means[j, i] for j, name in enumerate(("energy", "E", "C"))})
        return stats

    def _where(self, network: PCN, estimate: Estimate, record: dict) -> str:
        """Names the first non-finite quantity (the slow path, after ``finite`` was False)."""
        phase = {"forward": "+beta", "backward": "-beta", "random": "random-sign beta",
                 "centered": "+beta/-beta"}[self.scheme]
        bad = sorted(k for k, ok in record.get("states", {}).items() if not ok)
        detail = f"; non-finite states in layers {bad}" if bad else ""
        names = [name for name, _ in network.named_parameters()]
        grad = next((n for n, g in zip(names, record["grads"]) if not torch.isfinite(g).all()), None)
        if not torch.isfinite(estimate.loss):
            return f"non-finite loss {estimate.loss.item()} at the free state"
        if grad is not None:
            what, layer = f"gradient ({grad})", int(grad.split(".")[1]) + 1
        elif bad:
            what, layer = "state", bad[0]
        else:  # all finite: states that grew (a slow blow-up) or an energy that overflowed
            growth = record.get("growth", {})
            layer = max(growth, key=growth.get) if growth else network.depth
            what = (f"growth: the perturbation reached {growth[layer]:.3g}x the free state"
                    if growth else "nudged energy (overflow)")
            return (f"state {what} in layer {layer} after the {phase} nudged phase "
                    f"(K={self.dynamics.K}, rule={self.dynamics.rule}, order={self.dynamics.order}, "
                    f"alpha={self.dynamics.alpha}, beta={self.beta})")
        return (f"non-finite {what} in layer {layer} after the {phase} nudged phase "
                f"(K={self.dynamics.K}, rule={self.dynamics.rule}, order={self.dynamics.order}, "
                f"alpha={self.dynamics.alpha}, beta={self.beta}){detail}")


def compile_estimator(estimator: EquilibriumPropagation | Backprop, **options
                      ) -> Callable[[PCN, Tensor, Tensor], Estimate]:
    """``torch.compile`` an estimator call whole (``fullgraph=True``; ``options`` such as
    ``mode="reduce-overhead"`` for CUDA graphs pass through). EP's random signs are drawn just
    before the compiled region, from the estimator's generator on the data's device (a generator
    cannot be traced); the ``interrupt`` callback is not asked inside it. With ``check_finite`` the
    check (one sync) runs after the compiled step; with False the call never syncs."""
    # dynamic=False: K, the order and the network's topology are compile-time constants (the
    # wavefront schedule depends on them); a process that compiled another K must not turn K into a
    # symbolic int, which the schedule cannot take.
    options.setdefault("dynamic", False)
    return functools.partial(estimator.checked, torch.compile(estimator.estimate, fullgraph=True,
                                                              **options))


def gradient_fidelity(network: PCN, ep: EquilibriumPropagation, x: Tensor, y: Tensor,
                      betas: Tensor | None = None) -> dict:
    """How far the EP estimate is from backprop's gradient on one batch (``gradcheck`` and the
    training callback ``GradientFidelity`` both report this).

    ``tensors``: per parameter tensor, and ``layers``: per layer (its parameters as one vector),
    the cosine and the relative error ‖g_EP − g_BP‖ / ‖g_BP‖ (in float64); per layer also
    ``kinks``, the units that crossed a ReLU kink or whose max-pool winner changed during the
    relaxation (a finite-β effect), and ``ties``, the pool windows whose max is not unique in the
    free state (harmless in a layer whose input never moves, or with ``pool_routing="free"``).
    ``diverged``: a non-finite estimate, or a nudged prediction-error energy E above the free
    cost (the relaxation blew up). ``betas``: the signs to use (default: drawn from ``ep``'s
    generator, which advances); ``ep``'s settings are not changed, nor the network's buffers (its
    forward passes are a check, not training: a BatchNorm's running statistics are put back).
    It syncs: a diagnostic, not for every step.
    """
    kept = [(buffer, buffer.clone()) for buffer in network.buffers()]
    try:
        return _fidelity(network, ep, x, y, betas)
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


def _fidelity(network: PCN, ep: EquilibriumPropagation, x: Tensor, y: Tensor,
              betas: Tensor | None) -> dict:
    ep = copy.copy(ep)
    ep.count_kinks = True  # the interrupt stays: a stop request must not wait for this check
    if betas is None:
        betas = ep.signed_betas(x.shape[0], x.device)
    params = list(network.parameters())
    report: dict = {"diverged": False, "tensors": [], "layers": [], "min_cosine": None,
                    "max_rel_err": None}
    bp = Backprop(ep.cost.name, check_finite=False).estimate(network, x, y)
    estimate = ep.estimate(network, x, y, betas)
    if not bool(bp.finite):
        return {**report, "diverged": True, "reason": "non-finite loss at the free state"}
    if not bool(estimate.finite):
        return {**report, "diverged": True, "reason": ep.diagnose(network, x, y, estimate)}
    energies = [estimate.stats[k] for k in ("E+", "E-") if k in estimate.stats]
    if any(bool(e > bp.loss) for e in energies):  # NaN (a sign absent from the batch) is False
        report["diverged"] = True
        report["reason"] = (f"nudged prediction-error energy {max(e.item() for e in energies):.3g} "
                            f"exceeds the free cost {bp.loss.item():.3g}: the relaxation blew up")
    g_bp = torch.autograd.grad(bp.surrogate, params)
    g_ep = torch.autograd.grad(estimate.surrogate, params)
    for (name, _), a, b in zip(network.named_parameters(), g_ep, g_bp):
        report["tensors"].append({"name": name, **_agreement(a, b)})
    ties = _pool_ties(network, x)
    kinks = estimate.kinks + [0]  # the linear output layer has no kink
    start = 0
    for k, layer in enumerate(network.layers, start=1):
        n = len(list(layer.parameters()))
        a, b = (torch.cat([g.flatten() for g in gs[start:start + n]]) for gs in (g_ep, g_bp))
        start += n
        report["layers"].append({"layer": k, **_agreement(a, b), "kinks": kinks[k - 1],
                                 "ties": ties[k - 1], "pooled": layer.pool})
    report["min_cosine"] = min(r["cosine"] for r in report["tensors"])
    report["max_rel_err"] = max(r["rel_err"] for r in report["tensors"])
    report["kink_crossings"] = sum(kinks)
    report["pool_ties"] = sum(ties)
    return report


def _agreement(a: Tensor, b: Tensor) -> dict[str, float]:
    """Cosine and relative error of a against b, in float64 (0/0 reads as 0)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    cosine = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300)
    return {"cosine": cosine.item(), "rel_err": ((a - b).norm() / b.norm().clamp_min(1e-300)).item()}


def _pool_ties(network: PCN, x: Tensor) -> list[int]:
    """Per layer, the tied max-pool windows of the free state over the batch (0 without a pool)."""
    ties, h = [], [x]
    with torch.no_grad():
        for k, layer in enumerate(network.layers, start=1):
            if isinstance(layer, GenericLayer):  # no closed-form pool; running statistics kept
                ties.append(0)
                h.append(network.prediction(h, k))
                continue
            c = layer.linear(*network.layer_inputs(h, k)).to(x.dtype)
            ties.append(int(layer.tied_windows(c).sum()) if layer.pool else 0)
            h.append(layer.activation(layer.pool_bias(c)[0]))
    return ties

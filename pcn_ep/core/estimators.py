"""Gradient estimators with one interface: ``estimator(network, x, y) -> Estimate``.

``Estimate.surrogate`` is a scalar whose gradient w.r.t. the network's parameters *is* the estimate:
the mean cost for backprop; for EP, the linear form Σ_θ ⟨g_θ, θ⟩ with g_θ computed from detached
nudged states. Calling ``backward`` (or Lightning's ``manual_backward``) on it goes through autograd,
so DDP's gradient all-reduce, gradient clipping and optimizers work unchanged. Gradients are means
over the local batch, so DDP's averaging yields the mean over the global batch.

EP schemes (spec §2.1) are one batched nudged phase in which every example carries its own β_i and
contributes (1/β_i) ∂F/∂θ(θ, β_i, h^{β_i}) / copies to the estimate (∂F/∂θ = 0 at the free state,
spec Eq. 11, so no free-phase term is needed):

    forward  β_i = +β                 backward β_i = −β
    random   β_i = ±β, sign drawn per example
    centered the batch twice, β_i = +β then −β, each copy weighted ½   (spec Eq. 7)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .energy import Cost, get_cost
from .equilibrium import PERTURBATIONS, Dynamics, NudgedState, nudged_phase
from .networks import PCN

SCHEMES = ("forward", "backward", "random", "centered")


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite, with one device synchronization for all of them."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class DivergenceError(FloatingPointError):
    """A non-finite state or gradient; the message names the phase and the layer."""


@dataclass
class Estimate:
    """What one training step needs: the surrogate to backpropagate, and what to log."""

    surrogate: Tensor
    logits: Tensor  # free-phase output h_L* (the prediction)
    loss: Tensor  # mean cost at the free state
    stats: dict[str, Tensor] = field(default_factory=dict)
    trace: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    betas: Tensor | None = None
    kinks: list[int] | None = None  # per hidden layer, only with ``count_kinks``


class Backprop:
    """Plain backprop of the mean cost through the same network (the paper's baseline)."""

    def __init__(self, cost: str = "ce") -> None:
        self.cost: Cost = get_cost(cost)

    def predict(self, network: PCN, x: Tensor) -> Tensor:
        return network(x)

    def __call__(self, network: PCN, x: Tensor, y: Tensor) -> Estimate:
        logits = network(x)
        loss = self.cost.value(logits, y).mean()
        return Estimate(surrogate=loss, logits=logits.detach(), loss=loss.detach())


class EquilibriumPropagation:
    """EP on a PCN: free phase (a forward pass), nudged phase(s), local weight gradients.

    Args:
        cost: ``"ce"`` or ``"mse"``.
        perturbation: ``"nudge"`` (βC added to the energy) or ``"clamp"`` (spec Eq. 8).
        scheme: ``forward``, ``backward``, ``random`` or ``centered``.
        beta: the nudging strength |β| > 0; the scheme chooses the signs.
        dynamics: K, rule, order and α of the nudged phase.
        trace: record per-iteration energies (spec Fig. 8); costs a full forward per iteration.
        generator: RNG for the random scheme's signs (default: torch's global RNG).
        count_kinks: count the units that cross a ReLU/max-pool kink during the relaxation
            (``Estimate.kinks``; a diagnostic for gradcheck, not for training).
        interrupt: asked once per nudge iteration; True stops the phase with ``Interrupted``
            (the training module points it at its preemption flag).
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
        self.interrupt = interrupt

    def predict(self, network: PCN, x: Tensor) -> Tensor:
        """The prediction is the free state's output: a forward pass (spec §1.2)."""
        return network(x)

    def signed_betas(self, batch: int, device: torch.device) -> tuple[Tensor, int]:
        """Per-example β_i for the stacked nudged batch, and the number of copies of the batch."""
        ones = torch.ones(batch, device=device, dtype=torch.float64)
        if self.scheme == "forward":
            return self.beta * ones, 1
        if self.scheme == "backward":
            return -self.beta * ones, 1
        if self.scheme == "random":
            signs = torch.randint(0, 2, (batch,), generator=self.generator, device="cpu")
            return self.beta * (2 * signs.to(device, torch.float64) - 1), 1
        return torch.cat([self.beta * ones, -self.beta * ones]), 2

    def __call__(self, network: PCN, x: Tensor, y: Tensor) -> Estimate:
        with torch.no_grad():
            free = network.free_phase(x)
            logits = free.h[-1]
            betas, copies = self.signed_betas(x.shape[0], x.device)
            nudged = nudged_phase(
                network, free.repeat(copies), y.repeat(copies), betas, self.cost, self.dynamics,
                self.perturbation, self.trace, self.count_kinks, self.interrupt,
            )
            # (1/β_i) / copies / batch: the mean over examples of the per-example estimates.
            weights = 1.0 / (betas * copies * x.shape[0])
            errors = {k: nudged.h[k] - network.layers[k - 1].activation(nudged.a[k])
                      for k in nudged.error_layers}  # ε_k, zero for every other layer
            grads = self.parameter_gradients(network, nudged, errors, weights.to(logits.dtype))
            stats = self.nudged_stats(nudged, errors, y.repeat(copies), betas)
        surrogate = sum((g * p).sum() for g, p in zip(grads, network.parameters()))
        loss = self.cost.value(logits, y).mean()
        return Estimate(surrogate, logits, loss, stats, nudged.trace, betas, nudged.kinks)

    def parameter_gradients(
        self, network: PCN, nudged: NudgedState, errors: dict[int, Tensor], weights: Tensor
    ) -> list[Tensor]:
        """Σ_i w_i ∂F/∂θ at the nudged states, in ``network.parameters()`` order.

        ∂F/∂θ_k = −(∂a_k/∂θ_k)^T (ε_k ⊙ f_k'(a_k)) (spec §1.3): local, and zero for a layer whose
        error never became non-zero. Both phases of the centered scheme share one call per layer.
        """
        grads: list[Tensor] = []
        for k, layer in enumerate(network.layers, start=1):
            if k not in nudged.error_layers:
                grads.extend(torch.zeros_like(p) for p in layer.parameters())
                continue
            grad_a = layer.activation_vjp(errors[k], nudged.a[k])
            grad_a = grad_a * weights.view(-1, *([1] * (grad_a.dim() - 1)))
            grad_c = layer.unpool(grad_a, nudged.indices[k], nudged.c[k])
            x, skip = network.layer_inputs(nudged.h, k)
            grads.extend(-g for g in layer.param_grads(x, skip, grad_a, grad_c))
        self.check_finite(network, nudged, grads)
        return grads

    def check_finite(self, network: PCN, nudged: NudgedState, grads: list[Tensor]) -> None:
        """Raise ``DivergenceError`` naming the first layer with a non-finite gradient (one sync)."""
        if all_finite(grads):
            return
        names = [name for name, _ in network.named_parameters()]
        bad = next(n for n, g in zip(names, grads) if not torch.isfinite(g).all())
        layer = int(bad.split(".")[1]) + 1
        raise DivergenceError(self._where(nudged, layer, f"gradient ({bad})"))

    def _where(self, nudged: NudgedState, k: int, what: str) -> str:
        phase = {"forward": "+beta", "backward": "-beta", "random": "random-sign beta",
                 "centered": "+beta/-beta"}[self.scheme]
        bad = [j for j in range(1, len(nudged.h)) if not torch.isfinite(nudged.h[j]).all()]
        detail = f"; non-finite states in layers {bad}" if bad else ""
        return (f"non-finite {what} in layer {k} after the {phase} nudged phase "
                f"(K={self.dynamics.K}, rule={self.dynamics.rule}, order={self.dynamics.order}, "
                f"alpha={self.dynamics.alpha}, beta={self.beta}){detail}")

    def nudged_stats(
        self, nudged: NudgedState, errors: dict[int, Tensor], y: Tensor, betas: Tensor
    ) -> dict[str, Tensor]:
        """Mean E, C and F = E + βC at the nudged state(s), per sign of β (for logging)."""
        eps_sq = torch.zeros_like(betas, dtype=nudged.h[-1].dtype)
        for eps in errors.values():
            eps_sq = eps_sq + eps.flatten(1).pow(2).sum(1)
        e = 0.5 * eps_sq
        c = self.cost.value(nudged.h[-1], y)
        stats = {}
        for sign, mask in (("+", betas > 0), ("-", betas < 0)):
            if mask.any():
                f = e[mask] + betas[mask].to(e.dtype) * c[mask]
                stats[f"energy{sign}"] = f.mean()
                stats[f"E{sign}"] = e[mask].mean()
                stats[f"C{sign}"] = c[mask].mean()
        return stats

"""The nudged phase: K sweeps of (mod-)PGD from the free state (the paper's Sec. 4.1 and App. A).

Update of a hidden state (the paper's Eqs. 15-20), with a_k the pre-activation and Δ_k the top-down drive
Δ_k = −∂(Σ_{j reads h_k} ½‖ε_j‖²)/∂h_k = Σ_j (∂f_j/∂h_k)^T ε_j:

    PGD:      h_k ← ReLU((1 − α) h_k + α (ReLU(a_k) + Δ_k))
    mod-PGD:  h_k ← ReLU((1 − α) h_k + α (a_k + Δ_k))
    output:   h_L ← (1 − α) h_L + α (a_L − β ∂C/∂h_L(h_L, y))      (linear layer; same for both)

α = 1 is the paper's closed form; for α < 1, mod-PGD keeps a_k in place of ReLU(a_k) inside the same
damped step (our reading, [I]). Clamping (Eq. 8) fixes h_L = (1 − β) h_L* + β onehot(y) instead.

Traversal: ``async`` updates the even-numbered layers, then the odd ones (one iteration); ``sync``
updates all layers from the same old state. Inside one group every layer is computed from the state
at the start of the group, then all are written (layers of one parity never read each other in a
chain; a skip's co-parent is read at its old value).

Exact in float32 and bf16: the phase carries perturbations, δh_k = h_k − h*_k and δa_k = a_k − a*_k,
never absolute states. δa_k = W δh_{k-1} (through the pool, ``maxpool(d_k + W δh_{k-1})`` with d_k the
free window offsets), and ReLU(a* + u) − ReLU(a*) = max(u + min(a*, 0), −ReLU(a*)) is exact wherever
no unit crosses its kink: a nudge of 1e-6 keeps all its digits in every layer.

Minimum work and memory:

- one free state serves every sign: nudged tensors have shape (copies, batch, ...) and broadcast
  against it (centered EP runs +β and −β as copies = 2);
- a layer's δa_k is recomputed (one linear map) only after one of its inputs changed; each layer's
  transposed map is computed once per group and shared by the layers it feeds;
- wavefront skipping: a layer is updated only if its own error or a child's error can be non-zero
  (the perturbation travels two layers per async iteration). Which layers move, refresh and send
  their error down in each group depends only on the topology, K, order and perturbation, so it is
  computed once (``schedule``) and the traced step is straight-line tensor code (``torch.compile``
  with ``fullgraph=True``).

Every example carries its own β (a tensor), so the four estimators are one batched call.

Max-pool routing (``pool_routing``): ``nudged`` recomputes each window's max in the nudged phase, as
the energy F says; ``free`` keeps the free phase's winners, a_k = c_k[argmax*] + b_k, the derivative
backprop takes. They differ where a window's winner moves: near a tie at finite β, and at any β in a
window whose max is exactly tied in the free state (flat image regions). There δa = max over the tied
δc, so +β and −β route through different winners, and centered EP averages two routes where
backprop takes the first. The free winners of a pooled layer whose inputs move are the first argmax
of its window offsets d (exactly 0 at the max), so they cost no memory.

A ``GenericLayer`` fits the same plan: its refresh is δa_k = g_k(h) − a*_k with a VJP of g_k taken
at the same inputs (``torch.func.vjp``), which its next error sent down reuses; until its inputs
move, that VJP is taken at the free state. Everything else (rules, α, order, perturbation, kinks at
its output ReLU, the wavefront) is the built-in layers' code.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .energy import Cost, energy, one_hot
from .layers import GenericLayer
from .networks import PCN, FreeState

RULES = ("mod-pgd", "pgd")
POOL_ROUTINGS = ("free", "nudged")
ORDERS = ("async", "sync")
PERTURBATIONS = ("nudge", "clamp")


class Interrupted(Exception):
    """A stop request (e.g. a preemption signal) arrived during the nudged phase."""


@dataclass
class Dynamics:
    """How the nudged states move: K iterations of ``rule`` in ``order`` with step size α."""

    K: int = 10
    rule: str = "mod-pgd"
    order: str = "async"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise ValueError(f"K (nudge iterations) must be an integer >= 1, got {self.K!r}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {list(RULES)}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {list(ORDERS)}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha (step size) must be in (0, 1], got {self.alpha!r}")


def check_pool_routing(pool_routing: str) -> None:
    if pool_routing not in POOL_ROUTINGS:
        raise ValueError(f"unknown pool_routing {pool_routing!r}; choose one of {list(POOL_ROUTINGS)} "
                         "(nudged: the max recomputed in the nudged phase; free: the free phase's "
                         "winners kept, as backprop)")


_SCHEDULES: dict[tuple, tuple] = {}


@torch.compiler.assume_constant_result
def schedule(sources: tuple[tuple[int, ...], ...], K: int, order: str, clamp: bool):
    """``_plan`` for one topology and K, computed once (a compiled step takes it as a constant)."""
    key = (sources, K, order, clamp)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = _plan(*key)
    return _SCHEDULES[key]


def _plan(sources: tuple[tuple[int, ...], ...], K: int, order: str, clamp: bool):
    """The wavefront plan: per iteration, per group, (layers to refresh, layers whose error goes down,
    layers to update), as (first iterations, the steady iteration, its repeat count) since the plan
    stops changing once the perturbation reached every layer; then the layers whose error can be
    non-zero at the end and those to refresh.

    ``sources[k - 1]`` are the states layer k reads. Pure bookkeeping of which tensors can be
    non-zero: it depends on no value, so a traced step never branches on data."""
    L = len(sources)
    readers = {k: [j for j in range(1, L + 1) if k in sources[j - 1]] for k in range(L + 1)}
    moved, stale = ({L} if clamp else set()), set()

    def error(k: int) -> bool:
        return k in moved or any(s in moved for s in sources[k - 1])

    layers = range(1, L + 1)
    groups = [[k for k in layers if k % 2 == 0], [k for k in layers if k % 2 == 1]]
    plan = []
    while len(plan) < K:
        before = (frozenset(moved), frozenset(stale))
        plan.append([])
        for group in groups if order == "async" else [list(layers)]:
            updates = [k for k in group if (k < L and (error(k) or any(map(error, readers[k]))))
                       or (k == L and not clamp)]
            down = sorted({j for k in updates if k < L for j in readers[k] if error(j)})
            refresh = sorted(k for k in set(updates) | set(down) if k in stale)
            stale -= set(refresh)
            plan[-1].append((refresh, down, updates))
            for k in updates:
                moved.add(k)
                stale.update(readers[k])
        if (frozenset(moved), frozenset(stale)) == before:
            break  # a fixed point: every later iteration is this one (so a huge K costs nothing here)
    repeats = K - len(plan) + 1  # the last iteration, run this many times
    error_layers = [k for k in layers if error(k)]
    return (plan[:-1], plan[-1], repeats), error_layers, [k for k in error_layers if k in stale]


class NudgedState:
    """The relaxed state as perturbations of the free state (the running bookkeeping, too).

    ``delta[k]`` = h_k − h*_k and ``delta_a[k]`` = a_k − a*_k have shape (copies, batch, ...); ``None``
    means zero (not reached yet). ``indices[k]`` is the pool routing in use, flat (copies·batch, ...):
    the nudged argmax, or the free one with ``pool_routing="free"``.
    ``error_layers`` lists the layers whose ε_k can be non-zero; every other ε_k is exactly zero.
    ``trace`` (if asked) holds per-example E and C at iterations 0..K. ``kinks`` (if asked) counts,
    per hidden layer, the units that crossed a kink at any point: a ReLU switching (a_k or h_k
    changing sign relative to a*_k) or a max-pool window changing its argmax. EP then differentiates
    a piecewise function across the kink and is no longer backprop's one-sided derivative: a finite-β
    effect, gone as β → 0, that ``gradcheck`` reports (counting syncs: a diagnostic only).
    """

    def __init__(self, network: PCN, free: FreeState, copies: int, count_kinks: bool,
                 pool_routing: str = "free") -> None:
        L = network.depth
        self.net, self.free, self.copies = network, free, copies
        self.keep_free_routing = pool_routing == "free"
        self.delta: list[Tensor | None] = [None] * (L + 1)
        self.delta_a: list[Tensor | None] = [None] * (L + 1)
        self.indices: list[Tensor | None] = [None] * (L + 1)
        self.pullbacks: list[Callable | None] = [None] * (L + 1)  # generic layers' VJPs
        self.error_layers: list[int] = []
        self.trace: list[tuple[Tensor, Tensor]] = []
        self.kinks: list[int] | None = None
        self.crossed = ([None] + [torch.zeros((copies, *a.shape), dtype=torch.bool, device=a.device)
                                  for a in free.a[1:L]] if count_kinks else None)
        # generic layers' kinks inside g_k: {k: (signs at the free state, crossed)}
        self.inner: dict[int, tuple[list[Tensor], list[Tensor]]] = {}

    # -- free quantities (recomputed from a*, which is all that is stored) ---------------------
    def free_h(self, k: int) -> Tensor:
        return self.free.x if k == 0 else self.free.h_of(k)

    def state_shape(self, k: int) -> torch.Size:
        """Shape of h_k for the flat nudged batch."""
        h = self.free.x if k == 0 else self.free.a[k]
        return torch.Size((self.copies * h.shape[0], *h.shape[1:]))

    def kink_terms(self, k: int) -> tuple[Tensor, Tensor]:
        """(min(a*, 0), −ReLU(a*)): ReLU(a* + u) − ReLU(a*) = max(u + min(a*, 0), −ReLU(a*))."""
        q = self.free.a[k].clamp(max=0)
        return q, q - self.free.a[k]

    def relu_delta(self, k: int, u: Tensor) -> Tensor:
        """ReLU(a*_k + u) − ReLU(a*_k) (u for a linear layer), exact where no kink is crossed."""
        if not self.net.layers[k - 1].relu:
            return u
        q, lo = self.kink_terms(k)
        return torch.maximum(u + q, lo)

    # -- shapes ---------------------------------------------------------------------------------
    def flat(self, t: Tensor) -> Tensor:
        return t.flatten(0, 1)

    def split(self, t: Tensor) -> Tensor:
        return t.unflatten(0, (self.copies, -1))

    def absolute(self, k: int) -> Tensor:
        """h_k, flat (copies·batch, ...)."""
        h = self.free_h(k)
        h = h + self.delta[k] if self.delta[k] is not None else h.expand(self.copies, *h.shape)
        return self.flat(h)

    @property
    def h(self) -> list[Tensor]:
        """The absolute states h_0..h_L, flat (copies·batch, ...) (a diagnostic, computed on demand)."""
        return [self.absolute(k) for k in range(self.net.depth + 1)]

    def shape_c(self, k: int) -> torch.Size:
        """Shape of layer k's linear part c_k for the flat nudged batch."""
        layer, x = self.net.layers[k - 1], self.state_shape(k - 1)
        if layer.kind == "dense":
            return torch.Size((x[0], layer.weight.shape[0]))
        return torch.Size((x[0], layer.weight.shape[0], *x[-2:]))

    # -- the relaxation -------------------------------------------------------------------------
    def set_state(self, k: int, value: Tensor) -> None:
        self.delta[k] = value
        if self.crossed is not None and k < self.net.depth:
            self.crossed[k] |= (value > self.kink_terms(k)[1]) != (self.free.a[k] > 0)

    def refresh(self, k: int) -> None:
        """δa_k from the perturbations of layer k's inputs: one linear map (and one pool)."""
        layer, s = self.net.layers[k - 1], self.net.sources(k)
        if isinstance(layer, GenericLayer):
            inputs = [self.absolute(j) for j in s]
            a, self.pullbacks[k] = layer.input_vjp(inputs, self.copies)
            self.delta_a[k] = self.split(a.to(self.free.a[k].dtype)) - self.free.a[k]
            if self.crossed is not None and k < self.net.depth:  # kinks inside g_k
                if k not in self.inner:
                    free = layer.inner_signs([self.flat(self.free_h(j).expand(
                        self.copies, *self.free_h(j).shape)) for j in s], self.copies)
                    self.inner[k] = free, [torch.zeros_like(m) for m in free]
                free, crossed = self.inner[k]
                for c, f, now in zip(crossed, free, layer.inner_signs(inputs, self.copies)):
                    c |= f != now
            return self.count_crossings(k)
        inputs = [None if self.delta[j] is None else self.flat(self.delta[j]) for j in s]
        if inputs[0] is None:  # only the skip input moved
            inputs[0] = self.flat(torch.zeros_like(self.free_h(s[0])).expand(
                self.copies, *self.free_h(s[0]).shape))
        dc = self.split(layer.linear(*inputs).to(self.free.a[k].dtype))
        if self.free.d[k] is None:
            self.delta_a[k] = dc
        elif self.keep_free_routing:  # δa = δc at the free winners (d is 0 there), linear in δc
            if self.indices[k] is None:
                self.indices[k] = self.free_indices(k)
            routes = self.split(self.indices[k])
            self.delta_a[k] = dc.flatten(-2).gather(-1, routes.flatten(-2)).view(routes.shape)
        else:
            dc += self.free.d[k]  # in place: the nudged c is not kept after pooling
            da, self.indices[k] = F.max_pool2d(self.flat(dc), 2, 2, return_indices=True)
            self.delta_a[k] = self.split(da)
        self.count_crossings(k)

    def count_crossings(self, k: int) -> None:
        """With ``count_kinks``: mark layer k's units whose ReLU or max-pool winner switched."""
        if self.crossed is not None and k < self.net.depth:
            q, lo = self.kink_terms(k)
            self.crossed[k] |= ((self.delta_a[k] + q) > lo) != (self.free.a[k] > 0)
            if self.indices[k] is not None and not self.keep_free_routing:
                self.crossed[k] |= self.split(self.indices[k] != self.free_indices(k))

    def free_indices(self, k: int, copies: int | None = None) -> Tensor:
        """The free pool routing of layer k (stored, or the argmax of its window offsets), flat
        over ``copies`` (default: all)."""
        if self.free.indices[k] is None:
            indices = F.max_pool2d(self.free.d[k], 2, 2, return_indices=True)[1]
        else:
            indices = self.net.layers[k - 1].expand_routes(self.free.indices[k],
                                                           self.shape_c(k)[-1])
        return indices.repeat(copies or self.copies, *([1] * (indices.dim() - 1)))

    def error(self, k: int) -> tuple[Tensor, Tensor]:
        """(ε_k, ε_k ⊙ f_k'(a_k)), shape (copies, batch, ...): ε_k = δh_k − (f(a_k) − f(a*_k))."""
        relu, da, dh = self.net.layers[k - 1].relu, self.delta_a[k], self.delta[k]
        if da is None:  # the inputs have not moved: a_k = a*_k
            return dh, (dh.masked_fill(self.free.a[k] <= 0, 0.0) if relu else dh)
        if not relu:
            eps = -da if dh is None else dh - da
            return eps, eps
        q, lo = self.kink_terms(k)
        r = da + q
        moved = torch.maximum(r, lo)
        eps = -moved if dh is None else dh - moved
        return eps, eps.masked_fill(r <= lo, 0.0)

    def down(self, j: int) -> tuple[Tensor | None, ...]:
        """Layer j's error sent to its inputs (in ``sources(j)`` order):
        (∂c_j/∂inputs)^T unpool(ε_j ⊙ f'(a_j)), or a generic layer's VJP at its current inputs."""
        layer = self.net.layers[j - 1]
        grad_a = self.flat(self.error(j)[1])
        if isinstance(layer, GenericLayer):
            if self.pullbacks[j] is None:  # inputs not moved yet: the VJP at the free state
                inputs = [self.absolute(s) for s in self.net.sources(j)]
                self.pullbacks[j] = layer.input_vjp(inputs, self.copies)[1]
            return self.pullbacks[j](grad_a)
        if layer.pool and self.indices[j] is None:  # not refreshed yet: the free routing
            self.indices[j] = self.free_indices(j)
        grad_c = layer.unpool(grad_a, self.indices[j], self.shape_c(j))
        shapes = [self.state_shape(s) for s in self.net.sources(j)] + [None]
        return layer.input_vjp(grad_c, shapes[0], shapes[1])


def nudged_phase(
    network: PCN,
    free: FreeState,
    y: Tensor,
    betas: Tensor,
    cost: Cost,
    dynamics: Dynamics,
    perturbation: str = "nudge",
    trace: bool = False,
    count_kinks: bool = False,
    interrupt: Callable[[], bool] | None = None,
    pool_routing: str = "free",
) -> NudgedState:
    """Relax from the free state under per-example nudging strengths ``betas``.

    ``betas`` has ``copies × batch`` entries (copy c of example i at c·batch + i); the free state and
    ``y`` are not repeated. ``interrupt`` is asked once per iteration (a plain Python call, no device
    sync); when it returns True the relaxation stops with ``Interrupted``, so a preemption signal
    never waits for K iterations. Inside ``torch.compile`` it is not asked (the compiled step is
    one graph); the caller checks its flag between steps. ``pool_routing``: see the module's
    docstring."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {list(PERTURBATIONS)}")
    check_pool_routing(pool_routing)
    L, alpha, batch = network.depth, dynamics.alpha, free.x.shape[0]
    copies = betas.numel() // batch
    state = NudgedState(network, free, copies, count_kinks, pool_routing)
    out = free.a[L]
    beta = betas.view(copies, batch, *([1] * (out.dim() - 1))).to(out.dtype)
    neg_beta = -beta
    target = one_hot(y, out.shape[-1], out.dtype)
    if perturbation == "clamp":
        state.set_state(L, beta * (target - out))
    y_all = y.repeat(copies)
    history = [energy(network, state.h, y_all, cost, copies)] if trace else []
    plan, error_layers, final_refresh = schedule(
        tuple(tuple(network.sources(k)) for k in range(1, L + 1)), dynamics.K, dynamics.order,
        perturbation == "clamp")
    mod = dynamics.rule == "mod-pgd"

    def updated(k: int, sent: dict[int, tuple]) -> Tensor:
        layer, da, h = network.layers[k - 1], state.delta_a[k], state.delta[k]
        if k == L:
            u = neg_beta * cost.grad(out if h is None else out + h, target)
            u = u if da is None else da + u
            return u if alpha == 1.0 or h is None else (1 - alpha) * h + alpha * u
        u = da if mod or da is None else state.relu_delta(k, da)
        for j in network.readers(k):
            if j in sent:
                part = state.split(sent[j][network.sources(j).index(k)])
                u = part if u is None else u + part
        if alpha != 1.0:
            u = alpha * u if h is None else (1 - alpha) * h + alpha * u
        if not layer.relu:
            return u
        q, lo = state.kink_terms(k)
        return torch.maximum(u if not mod else u + q if alpha == 1.0 else u + alpha * q, lo)

    def group(refresh: list[int], down: list[int], updates: list[int]) -> dict[int, Tensor]:
        """New perturbations of ``updates``, all from the state at the start of the group."""
        for k in refresh:
            state.refresh(k)
        sent = {j: state.down(j) for j in down}  # freed on return
        return {k: updated(k, sent) for k in updates}

    prefix, steady, repeats = plan
    for groups in itertools.chain(prefix, itertools.repeat(steady, repeats)):
        if interrupt is not None and not torch.compiler.is_compiling() and interrupt():
            raise Interrupted("the nudged phase was interrupted by a stop request")
        for refresh, down, updates in groups:
            for k, value in group(refresh, down, updates).items():
                state.set_state(k, value)
        if trace:
            history.append(energy(network, state.h, y_all, cost, copies))

    for k in final_refresh:
        state.refresh(k)
    state.error_layers, state.trace = error_layers, history
    if count_kinks:
        state.kinks = [int(m.sum()) + sum(int(c.sum()) for c in state.inner.get(k, ([], []))[1])
                       for k, m in enumerate(state.crossed[1:], start=1)]
    return state

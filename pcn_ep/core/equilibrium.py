"""The nudged phase: K sweeps of (mod-)PGD from the free state (spec §3).

Update of a hidden state (spec Eqs. 15-20), with a_k the pre-activation and Δ_k the top-down drive
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

Minimum work (the design constraint of the core issue):
- the free state's linear parts c*_k are reused, and a layer's c_k is recomputed from the
  *perturbation*, c_k = c*_k + W (h_{k-1} − h*_{k-1}), only after one of its inputs changed: at most
  one linear map per changing layer per iteration, and small nudges keep their precision;
- each layer's transposed map (its vector-Jacobian product) is computed once per group and shared by
  the layers it feeds;
- wavefront skipping: a layer is updated only if its own error or a child's error can be non-zero;
  until the perturbation arrives it keeps its free value (it travels two layers per async iteration).

Every example in the batch carries its own β (a tensor), so the four estimators are one batched call.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .energy import Cost, energy
from .networks import PCN, FreeState

RULES = ("mod-pgd", "pgd")
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


@dataclass
class NudgedState:
    """The state after K iterations, with fresh pre-activations for every layer that can have error.

    ``error_layers`` lists the layers k whose ε_k can be non-zero; every other layer has ε_k = 0
    exactly and so contributes a zero weight gradient. ``trace`` (if requested) holds per-example
    E and C at iterations 0..K. ``kinks`` (if requested) counts, per hidden layer, the units that
    crossed a kink at any point of the relaxation: a ReLU switching (a_k or h_k changing sign
    relative to the free a_k*) or a max-pool window changing its argmax. EP then differentiates a
    piecewise function across the kink and no longer equals backprop's one-sided derivative: a
    finite-β effect, gone as β → 0, that ``gradcheck`` reports to explain a mismatch.
    """

    h: list[Tensor]
    c: list[Tensor | None]
    a: list[Tensor | None]
    indices: list[Tensor | None]
    error_layers: list[int]
    trace: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    kinks: list[int] | None = None


class _Relaxation:
    """Bookkeeping of one nudged phase: current states, cached pre-activations, what has moved."""

    def __init__(self, network: PCN, free: FreeState, count_kinks: bool = False) -> None:
        self.net, self.free = network, free
        self.h, self.c, self.a = list(free.h), list(free.c), list(free.a)
        self.indices = list(free.indices)
        self.moved: set[int] = set()  # states that may differ from the free state
        self.stale: set[int] = set()  # layers whose c_k, a_k predate a change of their inputs
        # Per hidden layer, the units that crossed a kink so far (only when asked: costs a compare).
        self.crossed = [torch.zeros_like(a, dtype=torch.bool) if count_kinks and k else None
                        for k, a in enumerate(free.a[: network.depth])]

    def set_state(self, k: int, value: Tensor) -> None:
        self.h[k] = value
        self.moved.add(k)
        self.stale.update(self.net.readers(k))
        self.note_kinks(k, value)

    def note_kinks(self, k: int, value: Tensor, indices: Tensor | None = None) -> None:
        if k < self.net.depth and self.crossed[k] is not None:
            self.crossed[k] |= (value > 0) != (self.free.a[k] > 0)
            if indices is not None:
                self.crossed[k] |= indices != self.free.indices[k]

    def error_may_be_nonzero(self, k: int) -> bool:
        return k in self.moved or any(p in self.moved for p in self.net.sources(k))

    def refresh(self, k: int) -> None:
        """Recompute c_k, a_k from the perturbation of layer k's inputs (if they changed)."""
        if k not in self.stale:
            return
        layer = self.net.layers[k - 1]
        x, skip = self.net.layer_inputs(self.h, k)
        x0, skip0 = self.net.layer_inputs(self.free.h, k)
        dc = layer.linear(x - x0, None if skip is None else skip - skip0)
        self.c[k] = self.free.c[k] + dc
        self.a[k], self.indices[k] = layer.pool_bias(self.c[k])
        self.stale.discard(k)
        self.note_kinks(k, self.a[k], self.indices[k])

    def error_signal(self, k: int) -> tuple[Tensor, Tensor]:
        """g_k = −∂(½‖ε_k‖²)/∂a_k = ε_k ⊙ f'(a_k), and the same w.r.t. the linear part c_k."""
        self.refresh(k)
        layer = self.net.layers[k - 1]
        grad_a = layer.activation_vjp(self.h[k] - layer.activation(self.a[k]), self.a[k])
        return grad_a, layer.unpool(grad_a, self.indices[k], self.c[k])

    def topdown(self, k: int, vjp_memo: dict[int, tuple]) -> Tensor | None:
        """Δ_k, summed over the layers that read h_k; ``None`` when every such error is zero."""
        total = None
        for j in self.net.readers(k):
            if not self.error_may_be_nonzero(j):
                continue
            if j not in vjp_memo:
                layer = self.net.layers[j - 1]
                x, skip = self.net.layer_inputs(self.h, j)
                grad_c = self.error_signal(j)[1]
                vjp_memo[j] = layer.input_vjp(grad_c, x.shape, None if skip is None else skip.shape)
            grad_x, grad_skip = vjp_memo[j]
            part = grad_x if k == j - 1 else grad_skip
            total = part if total is None else total + part
        return total


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
) -> NudgedState:
    """Relax from the free state under per-example nudging strengths ``betas`` (shape [batch]).

    ``interrupt`` is asked once per iteration (a plain Python call, no device sync); when it returns
    True the relaxation stops with ``Interrupted``, so a preemption signal never waits for K
    iterations to finish."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {list(PERTURBATIONS)}")
    L, alpha = network.depth, dynamics.alpha
    state = _Relaxation(network, free, count_kinks)
    beta = betas.view(-1, *([1] * (free.h[L].dim() - 1))).to(free.h[L].dtype)
    if perturbation == "clamp":
        target = F.one_hot(y, free.h[L].shape[1]).to(free.h[L].dtype)
        state.set_state(L, (1 - beta) * free.h[L] + beta * target)
    history = [energy(network, state.h, y, cost)] if trace else []

    def needs_update(k: int) -> bool:
        if k == L:
            return perturbation == "nudge"
        return state.error_may_be_nonzero(k) or any(
            state.error_may_be_nonzero(j) for j in network.readers(k)
        )

    def updated(k: int, vjp_memo: dict) -> Tensor:
        state.refresh(k)
        layer, a, h = network.layers[k - 1], state.a[k], state.h[k]
        if k == L:
            target = a - beta * cost.grad(h, y)
        else:
            target = a if dynamics.rule == "mod-pgd" else torch.relu(a)
            delta = state.topdown(k, vjp_memo)
            if delta is not None:
                target = target + delta
        if alpha != 1.0:
            target = (1 - alpha) * h + alpha * target
        return layer.activation(target)

    layers = range(1, L + 1)
    groups = [[k for k in layers if k % 2 == 0], [k for k in layers if k % 2 == 1]]
    if dynamics.order == "sync":
        groups = [list(layers)]
    for _ in range(dynamics.K):
        if interrupt is not None and interrupt():
            raise Interrupted("the nudged phase was interrupted by a stop request")
        for group in groups:
            vjp_memo: dict[int, tuple] = {}
            new = {k: updated(k, vjp_memo) for k in group if needs_update(k)}
            for k, value in new.items():
                state.set_state(k, value)
        if trace:
            history.append(energy(network, state.h, y, cost))

    error_layers = [k for k in layers if state.error_may_be_nonzero(k)]
    for k in error_layers:
        state.refresh(k)
    kinks = [int(m.sum()) for m in state.crossed[1:]] if count_kinks else None
    return NudgedState(state.h, state.c, state.a, state.indices, error_layers, history, kinks)


"""Costs C(h_L, y) and the PCN energy F(θ, β, h) = ½ Σ_k ‖h_k − f_k(h_{k-1})‖² + β C(h_L, y) (the paper's Eq. 12)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .networks import PCN


class Cost:
    """A per-example cost of the output state h_L and its gradient ∂C/∂h_L."""

    name: str

    def value(self, h: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def grad(self, h: Tensor, target: Tensor) -> Tensor:
        """∂C/∂h_L for a one-hot ``target`` (built once per step, broadcast over leading axes)."""
        raise NotImplementedError


def one_hot(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """onehot(y) by comparison: unlike ``F.one_hot`` it never checks the labels on the host."""
    return (y[:, None] == torch.arange(classes, device=y.device)).to(dtype)


class CrossEntropy(Cost):
    """C = −log softmax(h)_y; the softmax belongs to the cost, the output layer is linear (the paper's Sec. 4)."""

    name = "ce"

    def value(self, h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(h, y, reduction="none")

    def grad(self, h: Tensor, target: Tensor) -> Tensor:
        return torch.softmax(h, dim=-1) - target


class SquaredError(Cost):
    """C = ½ ‖h − onehot(y)‖² (the paper does not write the scaling out)."""

    name = "mse"

    def value(self, h: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (h - one_hot(y, h.shape[1], h.dtype)).pow(2).sum(1)

    def grad(self, h: Tensor, target: Tensor) -> Tensor:
        return h - target


COSTS: dict[str, Cost] = {"ce": CrossEntropy(), "mse": SquaredError()}


def get_cost(name: str) -> Cost:
    if name not in COSTS:
        raise ValueError(f"unknown cost {name!r}; choose one of {sorted(COSTS)}")
    return COSTS[name]


def energy(network: PCN, h: list[Tensor], y: Tensor, cost: Cost, copies: int = 1
           ) -> tuple[Tensor, Tensor]:
    """Per-example E = ½ Σ_k ‖h_k − f_k(h_{k-1})‖² and C(h_L, y); F = E + β C.

    ``h`` may hold ``copies`` nudged copies of the batch, flat (each its own batch statistics).
    Recomputes every layer from scratch: a diagnostic (traces, tests), not part of the fast path.
    """
    total = torch.zeros(h[0].shape[0], dtype=h[-1].dtype, device=h[-1].device)
    for k in range(1, network.depth + 1):
        eps = h[k] - network.prediction(h, k, copies)
        total = total + 0.5 * eps.flatten(1).pow(2).sum(1)
    return total, cost.value(h[-1], y)

"""A plain training loop over tensors, for problems so small that Lightning's per-step overhead
would dominate (sparse parity: ~1 ms per step). It reuses the estimators unchanged: the step is
``estimator(network, x, y).surrogate.backward()`` and an SGD step, exactly as in ``PCNEPModule``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class FitResult:
    train_acc: float  # at the end of training (not the best epoch)
    test_acc: float
    epochs_to_90: int | None  # first epoch whose test accuracy is >= 0.9
    seconds: float  # training and evaluation, data generation excluded
    test_curve: list[float] = field(default_factory=list)


def training_step(network: nn.Module, estimator, optimizer, x: Tensor, y: Tensor) -> None:
    """One update, as ``PCNEPModule`` takes it: the surrogate's gradient, then an SGD step."""
    optimizer.zero_grad(set_to_none=True)
    estimator(network, x, y).surrogate.backward()
    optimizer.step()


def accuracy(estimator, network: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (estimator.predict(network, x).argmax(1) == y).float().mean().item()


def fit_tensors(
    network: nn.Module,
    estimator,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    seed: int = 0,
) -> FitResult:
    """SGD on (x, y) tensors, shuffled per epoch from ``seed``; test accuracy after every epoch."""
    x, y = train
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=nesterov)
    order = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=order).split(batch_size):
            training_step(network, estimator, optimizer, x[idx], y[idx])
        curve.append(accuracy(estimator, network, *test))
    train_acc = accuracy(estimator, network, x, y)
    seconds = time.perf_counter() - start
    reached = next((e + 1 for e, acc in enumerate(curve) if acc >= 0.9), None)
    return FitResult(train_acc, curve[-1], reached, seconds, curve)

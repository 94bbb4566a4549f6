"""A plain training loop over tensors, for problems so small that Lightning's per-step overhead
would dominate (sparse parity: ~1 ms per step). It reuses the estimators unchanged: the step is
``estimator(network, x, y).surrogate.backward()`` and an SGD step, exactly as in ``PCNEPModule``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

SCHEDULES = ("constant", "cosine")


@dataclass
class FitResult:
    train_acc: float  # at the end of training (not the best epoch)
    test_acc: float
    seconds: float  # wall clock of training and evaluation, data generation excluded
    cpu_seconds: float  # this process's CPU time over the same span (robust to a busy machine)
    test_curve: list[float] = field(default_factory=list)  # test accuracy after each epoch

    def first_epoch(self, accuracy: float) -> int | None:
        """The first epoch (1-based) whose test accuracy reached ``accuracy``, if any."""
        return next((e + 1 for e, acc in enumerate(self.test_curve) if acc >= accuracy), None)


def sgd(network: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum,
                           weight_decay=weight_decay, nesterov=nesterov)


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
    schedule: str = "constant",
) -> FitResult:
    """SGD on (x, y) tensors, shuffled per epoch from ``seed``; test accuracy after every epoch.

    ``schedule="cosine"`` decays the learning rate at every step from ``lr`` to 0 at the last one,
    so that the weights settle: the last epoch is then not a lucky (or unlucky) point of a noisy walk.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    x, y = train
    optimizer = sgd(network, lr, momentum, weight_decay, nesterov)
    order = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(len(y) / batch_size)
    curve, step = [], 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=order).split(batch_size):
            if schedule == "cosine":
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            training_step(network, estimator, optimizer, x[idx], y[idx])
            step += 1
        curve.append(accuracy(estimator, network, *test))
    train_acc = accuracy(estimator, network, x, y)
    return FitResult(train_acc, curve[-1], time.perf_counter() - start,
                     time.process_time() - cpu_start, curve)

"""Weighted ARD (average reuse distance) of one training step, read off its real tensor operations.

The sparse-parity project's data-movement proxy (documentation: Sparse parity): one clock
counted in floats; writing a buffer stamps it with the clock; reading it records (size, clock −
stamp), or nothing if it was never written; either advances the clock by the size. Weighted ARD is
Σ size·d / Σ size over the recorded reads, DMC is Σ size·√d.

The project instrumented each method by hand, so each figure depended on what its author chose to
count. Here one ``TorchDispatchMode`` sees every aten operation of the step (forward, autograd's
backward, the optimizer): each reads its tensor arguments and writes its fresh or mutated outputs,
buffers being storages. Every method is measured by the same rule.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..training.fastfit import training_step


def footprint(t: Tensor) -> int:
    """Distinct elements a tensor covers: a broadcast (stride-0) dimension holds one copy."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.numel() else 0


def buffer(t: Tensor) -> int:
    """The key of a tensor's buffer: its storage, shared by all its views."""
    return t.untyped_storage().data_ptr()


class ReuseTracker:
    """The project's tracker: ``write`` stamps a buffer, ``read`` measures the distance to it."""

    def __init__(self) -> None:
        self.clock, self.stamp = 0, {}
        self.reads: list[tuple[int, int]] = []  # (size, distance) of each read of a written buffer
        self.writes = self.unwritten_reads = 0

    def write(self, key: int, size: int) -> None:
        self.stamp[key] = self.clock
        self.clock += size
        self.writes += 1

    def read(self, key: int, size: int) -> None:
        if key in self.stamp:
            self.reads.append((size, self.clock - self.stamp[key]))
        else:
            self.unwritten_reads += 1  # skipped, as in the project, but the floats still pass
        self.clock += size

    @property
    def weighted_ard(self) -> float:
        floats = sum(s for s, _ in self.reads)
        return sum(s * d for s, d in self.reads) / floats if floats else 0.0

    @property
    def dmc(self) -> float:
        return sum(s * math.sqrt(d) for s, d in self.reads)

    def summary(self) -> dict:
        return {"weighted_ard": self.weighted_ard, "dmc": self.dmc, "reads": len(self.reads),
                "writes": self.writes, "floats": self.clock,
                "unwritten_reads": self.unwritten_reads}


class TensorOpTracker(TorchDispatchMode):
    """Feeds a ``ReuseTracker`` from every aten operation run under it.

    An operation reads each buffer among its arguments once (the footprint of its largest view),
    then writes each argument it mutates and each output with a storage of its own. An operation
    that only returns views of its arguments (view, transpose, expand, detach) moves no data and
    is not counted.
    """

    def __init__(self, tracker: ReuseTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        seen = {buffer(t) for t in inputs}
        mutated = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                mutated += [t for t in tree_leaves(value) if isinstance(t, Tensor)]
        fresh = [t for t in tree_leaves(out) if isinstance(t, Tensor) and buffer(t) not in seen]
        if mutated or fresh:
            for key, size in _by_buffer(inputs).items():
                self.tracker.read(key, size)
            for key, size in _by_buffer(mutated + fresh).items():
                self.tracker.write(key, size)
        return out


def _by_buffer(tensors: list[Tensor]) -> dict[int, int]:
    """One access per buffer and operation (``x * x`` reads x once), of its largest view."""
    sizes: dict[int, int] = {}
    for t in tensors:
        sizes[buffer(t)] = max(sizes.get(buffer(t), 0), footprint(t))
    return sizes


def measure(step: Callable[[], object], resident: Iterable[Tensor]) -> ReuseTracker:
    """Run ``step`` once under the tracker. ``resident`` (the parameters, optimizer state and batch
    that exist before the step) are written first, in order, as the project's own steps begin."""
    tracker = ReuseTracker()
    for t in resident:
        tracker.write(buffer(t), footprint(t))
    with TensorOpTracker(tracker):
        step()
    return tracker


def step_ard(network: torch.nn.Module, estimator, optimizer: torch.optim.Optimizer, x: Tensor,
             y: Tensor) -> ReuseTracker:
    """One real training step (``fastfit.training_step``: estimate, backward, SGD step), tracked."""
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    return measure(lambda: training_step(network, estimator, optimizer, x, y),
                   [*network.parameters(), *state, x, y])

"""``GradientFidelity``: how close EP's gradient is to backprop's, watched while training.

Every ``every_n_steps`` optimizer steps, just before the step, on the step's own batch, weights and
random-scheme signs, it compares the EP estimate with backprop's gradient
(``pcn_ep.core.gradient_fidelity``, the comparison ``gradcheck`` prints) and logs to every logger
(CSV, W&B), at that global step and with the epoch:

    fidelity/layer{k}/cosine    cosine of layer k's EP gradient (its parameters as one vector)
    fidelity/layer{k}/rel_err   ‖g_EP − g_BP‖ / ‖g_BP‖ for layer k
    fidelity/layer{k}/kinks     units of layer k whose ReLU or max-pool winner changed in the relaxation
    fidelity/layer{k}/ties      (pooled layers) windows of layer k whose max is tied in the free state
    fidelity/min_cosine, fidelity/max_rel_err   the worst parameter tensor
    fidelity/diverged           1 when the relaxation blew up on that batch (0 otherwise)

It does not disturb training: the gradients come from ``torch.autograd.grad`` (no ``.grad`` is
written and no DDP hook fires), the random signs from a copy of the module's sign generator (the
step then draws the very same signs), the estimator is copied before kink counting is switched on,
and the network's buffers (a BatchNorm's running statistics) are put back after the check.
Under DDP only global rank 0 computes, on its own batch, with no collective inside, so it cannot
deadlock: the other ranks reach the step's all-reduce first and wait there for rank 0, as for a slow
step. Cost per check: one backprop and one EP estimate with kink counting (README, BENCHMARKS.md).
"""
from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..core import EquilibriumPropagation, gradient_fidelity


class GradientFidelity(Callback):
    """Log EP-vs-backprop fidelity every ``every_n_steps`` steps (see the module docstring).

    Args:
        every_n_steps: optimizer steps between two checks (the first is at step 0).
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"GradientFidelity every_n_steps must be an integer >= 1, got "
                             f"{every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.latest: dict[str, float] | None = None  # the last check's metrics
        self._checked_step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        step, ep = trainer.global_step, getattr(pl_module, "estimator", None)
        if (step % self.every_n_steps or step == self._checked_step or not trainer.is_global_zero
                or not isinstance(ep, EquilibriumPropagation)):
            return
        self._checked_step = step  # a skipped (diverged) batch does not advance the step
        x, y = batch
        with trainer.precision_plugin.train_step_context():  # buffers left as they were
            report = gradient_fidelity(pl_module.network, ep, x, y, next_signs(ep, x))
        self.latest = {**metrics(report), "epoch": float(trainer.current_epoch)}
        for logger in trainer.loggers:
            logger.log_metrics(self.latest, step=step)


def next_signs(ep: EquilibriumPropagation, x: torch.Tensor) -> torch.Tensor:
    """The β_i the estimator will draw for this batch, drawn from a copy of its generator."""
    if ep.scheme != "random":
        return ep.signed_betas(x.shape[0], x.device)  # no randomness
    clone = copy.copy(ep)
    if ep.generator is None:  # torch's global RNG: draw, then put its state back
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            return clone.signed_betas(x.shape[0], x.device)
    clone.generator = torch.Generator(device=ep.generator.device)
    clone.generator.set_state(ep.generator.get_state())
    return clone.signed_betas(x.shape[0], x.device)


def metrics(report: dict) -> dict[str, float]:
    """A ``gradient_fidelity`` report as flat, loggable metrics."""
    out = {"fidelity/diverged": float(report["diverged"])}
    if not report["layers"]:  # non-finite: nothing to compare
        return out
    out.update({"fidelity/min_cosine": report["min_cosine"],
                "fidelity/max_rel_err": report["max_rel_err"]})
    for r in report["layers"]:
        for key in ("cosine", "rel_err", "kinks") + (("ties",) if r["pooled"] else ()):
            out[f"fidelity/layer{r['layer']}/{key}"] = float(r[key])
    return out

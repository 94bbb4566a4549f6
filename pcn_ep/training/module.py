"""``PCNEPModule``: the one place where the core library meets Lightning.

Manual optimization: ``training_step`` asks the estimator (EP or backprop, same network) for a
surrogate whose gradient is the update, calls ``manual_backward`` on it (so DDP all-reduces it), and
takes one optimizer step. Validation and test are a forward pass: top-1 / top-5 error.
"""
from __future__ import annotations

import time
import warnings

import lightning as L
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ..core import PCN, Backprop, DivergenceError, Dynamics, EquilibriumPropagation, all_finite


class PCNEPModule(L.LightningModule):
    """Train a PCN with equilibrium propagation (``algorithm="ep"``) or backprop (``"bp"``).

    Args:
        network: the PCN (``pcn_ep.core.MLP``, ``VGG5``, ``VGG10``, ``VGG10Skip``).
        algorithm: ``ep`` or ``bp`` (the baseline, same network).
        cost: ``ce`` or ``mse``. perturbation: ``nudge`` or ``clamp``.
        scheme: ``forward``, ``backward``, ``random`` or ``centered``. beta: |β| > 0.
        K, rule, order, alpha: the nudged phase (spec §3).
        lr, momentum, nesterov, weight_decay: SGD (spec §6: Nesterov momentum 0.9).
        t_max, eta_min: cosine annealing to ``eta_min`` over ``t_max`` epochs (default: max_epochs).
        schedule_interval: ``epoch`` (the paper) or ``step`` (the same curve, updated every step).
        layer_lrs: optional learning rate per layer (one entry per layer; the paper uses one).
        seed: seeds the random scheme's sign generator (its state is checkpointed).
        on_divergence: a non-finite loss, state or gradient in a step either ``stop``s the run
            with an error naming epoch, step, phase and layer (default), or ``skip``s the batch
            (no update; counted and logged as ``skipped_batches``) until ``max_skipped`` is exceeded.
            The checkpoint of the last good epoch is never overwritten by a diverged model.
    """

    def __init__(
        self,
        network: PCN,
        algorithm: str = "ep",
        cost: str = "ce",
        perturbation: str = "nudge",
        scheme: str = "centered",
        beta: float = 0.05,
        K: int = 10,
        rule: str = "mod-pgd",
        order: str = "async",
        alpha: float = 1.0,
        lr: float = 0.02,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 2e-4,
        t_max: int | None = None,
        eta_min: float = 0.0,
        schedule_interval: str = "epoch",
        layer_lrs: list[float] | None = None,
        seed: int = 0,
        on_divergence: str = "stop",
        max_skipped: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.automatic_optimization = False
        self.network = network
        if algorithm not in ("ep", "bp"):
            raise ValueError(f"algorithm must be 'ep' or 'bp', got {algorithm!r}")
        if schedule_interval not in ("epoch", "step"):
            raise ValueError(f"schedule_interval must be 'epoch' or 'step', got {schedule_interval!r}")
        if on_divergence not in ("stop", "skip"):
            raise ValueError(f"on_divergence must be 'stop' or 'skip', got {on_divergence!r}")
        if layer_lrs is not None and len(layer_lrs) != network.depth:
            raise ValueError(f"layer_lrs has {len(layer_lrs)} entries, the network {network.depth} layers")
        self.signs = torch.Generator().manual_seed(seed)
        if algorithm == "bp":
            self.estimator = Backprop(cost)
        else:
            self.estimator = EquilibriumPropagation(
                cost, perturbation, scheme, beta, Dynamics(K, rule, order, alpha),
                generator=self.signs,
            )
        classes = network.layers[-1].weight.shape[0]
        self.metrics = torch.nn.ModuleDict({
            f"{split}_top{k}": MulticlassAccuracy(classes, top_k=k, average="micro")
            for split in ("val", "test") for k in ((1, 5) if classes >= 5 else (1,))
        })
        self._last_step_start: float | None = None
        self.skipped_batches = 0

    def configure_callbacks(self):
        from .callbacks import PreemptionCheckpoint

        return [PreemptionCheckpoint()]

    @property
    def num_classes(self) -> int:
        return self.network.layers[-1].weight.shape[0]

    def setup(self, stage: str) -> None:
        """Fail before training if the data does not fit the network."""
        data = getattr(self.trainer, "datamodule", None)
        classes = getattr(data, "num_classes", None)
        if classes is not None and classes != self.num_classes:
            raise ValueError(f"the data has {classes} classes but the network outputs "
                             f"{self.num_classes} (set model.network.init_args.num_classes)")
        if self.hparams.algorithm == "ep" and self.global_rank != 0:
            self.signs.manual_seed(self.hparams.seed + self.global_rank)  # DDP: signs differ per rank

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        now = time.perf_counter()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        try:
            estimate = self.estimator(self.network, x, y)
            if not torch.isfinite(estimate.loss):
                raise DivergenceError(f"non-finite loss {estimate.loss.item()} at the free state")
        except DivergenceError as err:
            return self._diverged(err)
        self.manual_backward(estimate.surrogate)
        if self.hparams.algorithm == "bp" and not all_finite(
                [p.grad for p in self.network.parameters()]):
            optimizer.zero_grad()
            return self._diverged(DivergenceError("non-finite backprop gradient"))
        optimizer.step()
        if self.hparams.schedule_interval == "step":
            self.lr_schedulers().step()

        error = (estimate.logits.argmax(1) != y).float().mean()
        log = {"train/loss": estimate.loss, "train/error": error,
               "lr": optimizer.param_groups[0]["lr"]}
        if self.hparams.algorithm == "ep":
            log.update({"beta": self.hparams.beta, "K": float(self.hparams.K)})
            log.update({f"train/{k}": v for k, v in estimate.stats.items()})
        if self._last_step_start is not None:
            step_time = now - self._last_step_start
            log.update({"step_time_s": step_time, "images_per_s": len(y) / step_time})
        self._last_step_start = now
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(y))
        self.log("train_error", error, prog_bar=True, on_step=True, on_epoch=False)
        return estimate.loss

    def _diverged(self, err: DivergenceError) -> None:
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        if self.hparams.on_divergence == "stop" or self.skipped_batches >= self.hparams.max_skipped:
            extra = (f" (after skipping {self.skipped_batches} batches)"
                     if self.hparams.on_divergence == "skip" else "")
            raise DivergenceError(f"training diverged at {where}{extra}: {err}")
        self.skipped_batches += 1
        self.log("skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return None

    def on_train_epoch_start(self) -> None:
        """Bring a per-epoch schedule to the current epoch. Idempotent, so a checkpoint saved
        before or after the epoch's end resumes on the same learning rate."""
        if self.hparams.schedule_interval == "epoch":
            scheduler = self.lr_schedulers()
            with warnings.catch_warnings():  # after a resume no optimizer step has run yet: fine
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                while scheduler.last_epoch < self.current_epoch:
                    scheduler.step()

    def configure_optimizers(self):
        hp = self.hparams
        if hp.layer_lrs is None:
            groups = [{"params": list(self.network.parameters()), "lr": hp.lr}]
        else:
            groups = [{"params": list(layer.parameters()), "lr": lr}
                      for layer, lr in zip(self.network.layers, hp.layer_lrs)]
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                    weight_decay=hp.weight_decay)
        t_max = hp.t_max or self.trainer.max_epochs
        if hp.schedule_interval == "step":
            t_max = t_max * max(1, self.trainer.estimated_stepping_batches // self.trainer.max_epochs)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max,
                                                               eta_min=hp.eta_min)
        return [optimizer], [{"scheduler": scheduler, "interval": hp.schedule_interval}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sign_generator"] = self.signs.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sign_generator" in checkpoint:
            self.signs.set_state(checkpoint["sign_generator"])

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        x, y = batch
        logits = self.network(x)
        loss = self.estimator.cost.value(logits, y).mean()
        self.log(f"{split}/loss", loss, batch_size=len(y), sync_dist=True)
        for name, metric in self.metrics.items():
            if name.startswith(split):
                metric.update(logits, y)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _log_errors(self, split: str) -> None:
        for name, metric in self.metrics.items():
            if name.startswith(split):
                k = name.split("_top")[1]
                self.log(f"{split}/top{k}_error", 1 - metric.compute(), prog_bar=(k == "1"))
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_errors("val")

    def on_test_epoch_end(self) -> None:
        self._log_errors("test")

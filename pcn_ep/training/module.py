"""``PCNEPModule``: the one place where the core library meets Lightning.

Manual optimization: ``training_step`` asks the estimator (EP or backprop, same network) for a
surrogate whose gradient is the update, calls ``manual_backward`` on it (so DDP all-reduces it), and
takes one optimizer step. Validation and test are a forward pass: top-1 / top-5 error.
"""
from __future__ import annotations

import sys
import time
import warnings

import lightning as L
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ..core import (PCN, POOL_ROUTINGS, Backprop, DivergenceError, Dynamics, EquilibriumPropagation,
                    compile_estimator)
from ..data.base import finish_epoch
from .callbacks import LastCheckpoint, Preemption, RunFolderLock, model_checkpoints


class BadBatch(ValueError):
    """A batch that no network can learn from or be scored on (labels out of range, NaN inputs)."""


LOSS_JUMP = 1e3  # the factor by which one step may raise its batch's loss before it counts as divergence


class PCNEPModule(L.LightningModule):
    """Train a PCN with equilibrium propagation (``algorithm="ep"``) or backprop (``"bp"``).

    Args:
        network: the PCN (``pcn_ep.core.MLP``, ``VGG5``, ``VGG10`` or ``VGG10Skip``).
        algorithm: ``ep`` (equilibrium propagation) or ``bp`` (backprop through the same network,
            the baseline).
        cost: the output cost C: ``ce`` (cross-entropy) or ``mse`` (½‖h_L − onehot(y)‖²).
        perturbation: how β acts on the output: ``nudge`` (β C added to the energy) or ``clamp``
            (h_L pulled towards the one-hot target).
        scheme: which nudged states EP contrasts: ``forward`` (+β), ``backward`` (−β), ``random``
            (a sign per example) or ``centered`` (+β and −β).
        beta: the nudge strength |β| > 0 (EP only).
        K: nudged-phase iterations, each a sweep over the layers (about the number of
            layers: the paper's rule of thumb, Sec. 5.2).
        rule: the state update: ``mod-pgd`` (the paper's) or ``pgd``.
        order: layer traversal: ``async`` (even then odd layers, the paper's) or ``sync`` (all at once).
        alpha: step size of the state update; 1 is the closed form.
        pool_routing: max-pool routing in the nudged phase: ``free`` (the free phase's winners kept,
            as backprop's derivative does; README: why it is the default) or ``nudged`` (each
            window's max recomputed, the literal reading of the paper's Eq. 17).
        lr: SGD learning rate (the same for every layer unless ``layer_lrs`` is set).
        momentum: SGD momentum (the paper's Tables 7-8: 0.9).
        nesterov: Nesterov momentum (the paper's Tables 7-8: on).
        weight_decay: SGD weight decay (L2).
        t_max: epochs of cosine annealing from ``lr`` to ``eta_min``; null: ``trainer.max_epochs``.
        eta_min: the learning rate at the end of the cosine schedule.
        schedule_interval: when the cosine schedule steps: ``epoch`` (the paper) or ``step`` (the
            same curve, updated every step).
        layer_lrs: optional learning rate per layer (one entry per layer; the paper uses one).
        seed: seeds the random scheme's sign generator (its state is checkpointed); the configs set
            it to ``${seed_everything}``.
        on_divergence: a non-finite loss, state or gradient in a step either ``stop``s the run
            with an error naming epoch, step, phase and layer (default), or ``skip``s the batch
            (no update; counted and logged as ``skipped_batches``) until ``max_skipped`` is exceeded.
            The checkpoint of the last good epoch is never overwritten by a diverged model.
        max_skipped: with ``on_divergence: skip``, the number of skipped batches after which the
            run stops anyway.
        max_energy_ratio: a slow blow-up guard. At a nudged equilibrium E(h^β) <= β C(h*) (the
            relaxation lowers F = E + βC from its free-state value βC(h*)), so a nudged energy E
            above ``max_energy_ratio`` x β x the free-phase cost means the relaxation is running
            away (states growing, the EP gradient no longer tracking backprop): treated as
            divergence. ``null`` turns it off.
        compile: ``torch.compile`` the estimator call whole (``fullgraph=True``: the nudged phase
            has no graph break); the preemption check then happens between steps, not inside one.
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
        pool_routing: str = "free",
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
        max_energy_ratio: float | None = 100.0,
        compile: bool = False,
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
        if pool_routing not in POOL_ROUTINGS:
            raise ValueError(f"model.pool_routing must be 'nudged' (the max recomputed in the nudged "
                             f"phase) or 'free' (the free phase's winners kept), got {pool_routing!r}")
        if not 0 <= lr < float("inf"):
            raise ValueError(f"model.lr must be a finite number >= 0, got {lr!r}")
        if t_max is not None and (isinstance(t_max, bool) or t_max < 1):
            raise ValueError(f"model.t_max (cosine schedule length in epochs) must be >= 1, got {t_max!r}")
        if max_energy_ratio is not None and not max_energy_ratio > 0:
            raise ValueError(f"model.max_energy_ratio must be > 0 or null, got {max_energy_ratio!r}")
        if not 0 <= momentum < 1 or weight_decay < 0 or eta_min < 0 or max_skipped < 0:
            raise ValueError("model.momentum must be in [0, 1), and weight_decay, eta_min and "
                             f"max_skipped >= 0; got {momentum}, {weight_decay}, {eta_min}, {max_skipped}")
        if layer_lrs is not None and len(layer_lrs) != network.depth:
            raise ValueError(f"layer_lrs has {len(layer_lrs)} entries, the network {network.depth} layers")
        self.signs = torch.Generator().manual_seed(seed)
        if algorithm == "bp":
            self.estimator = Backprop(cost)
        else:
            self.estimator = EquilibriumPropagation(
                cost, perturbation, scheme, beta, Dynamics(K, rule, order, alpha),
                pool_routing=pool_routing,
                generator=self.signs,
            )
        self.estimator.check_finite = False  # the step reads one health flag instead (_healthy)
        self._estimate = compile_estimator(self.estimator) if compile else self.estimator
        self._restored_signs: list | None = None
        classes = network.layers[-1].weight.shape[0]
        self.metrics = torch.nn.ModuleDict({
            f"{split}_top{k}": MulticlassAccuracy(classes, top_k=k, average="micro")
            for split in ("val", "test") for k in ((1, 5) if classes >= 5 else (1,))
        })
        self._last_step_start: float | None = None
        self.skipped_batches = 0

    def configure_callbacks(self):
        """Preemption always; with checkpointing on, the folder's lock and ``last.ckpt``."""
        callbacks = [Preemption()]
        if model_checkpoints(self.trainer):  # a folder of checkpoints to own and keep current
            callbacks += [RunFolderLock(), LastCheckpoint()]
        return callbacks

    @property
    def num_classes(self) -> int:
        return self.network.layers[-1].weight.shape[0]

    def setup(self, stage: str) -> None:
        """Fail before training if the data does not fit the network; per-rank sign generators and
        the CPU process group the ranks agree through (DDP)."""
        data = getattr(self.trainer, "datamodule", None)
        classes = getattr(data, "num_classes", None)
        if classes is not None and classes != self.num_classes:
            raise ValueError(f"the data has {classes} classes but the network outputs "
                             f"{self.num_classes} (set model.network.init_args.num_classes)")
        shape = data.example_shape() if hasattr(data, "example_shape") else None
        if shape is not None:
            self._check_input_shape(tuple(shape))
        if (torch.distributed.is_available() and torch.distributed.is_initialized()
                and getattr(self, "_flag_group", None) is None):
            self._flag_group = torch.distributed.new_group(backend="gloo")

    def _check_input_shape(self, shape: tuple[int, ...]) -> None:
        """One example of the data's shape through the network, on the CPU, before training; in
        eval mode, so that a normalization layer's running statistics do not see the probe."""
        first = self.network.layers[0].weight
        probe = torch.zeros((1, *shape), dtype=first.dtype, device=first.device)
        training = self.network.training
        try:
            with torch.no_grad():
                self.network.eval()(probe)
        except RuntimeError as err:
            wants = (f"in_channels {first.shape[1]}" if first.dim() == 4 else f"in_features {first.shape[1]}")
            raise ValueError(
                f"the data's examples have shape {list(shape)} but the network "
                f"({type(self.network).__name__}, {wants}) cannot take them: "
                f"{str(err).splitlines()[0]} (set model.network.init_args.in_channels / input_size "
                "to match the data)") from None
        finally:
            self.network.train(training)

    def on_fit_start(self) -> None:
        """The random scheme's signs are drawn on the device (no host sync), from a generator made
        here, after the model reached its device: seeded by seed + rank (DDP: signs differ per
        rank), or this rank's state from the checkpoint being resumed."""
        self.signs = torch.Generator(device=self.device).manual_seed(self.hparams.seed + self.global_rank)
        states = self._restored_signs or []
        if self.global_rank < len(states):
            try:
                self.signs.set_state(states[self.global_rank])
            except RuntimeError:  # saved on another device type: a fresh stream, said once
                print("pcn_ep: warning: the checkpoint's sign generator is for another device; "
                      "signs restart from model.seed", file=sys.stderr)
        if self.hparams.algorithm == "ep":
            self.estimator.generator = self.signs

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        """One update. The health of the step (finite loss and gradients, nudged energy within
        ``max_energy_ratio``) is read from the device once, at the end, before the optimizer step;
        under DDP the ranks agree on it so that they all take the step or all skip it. A stop
        request (a signal) never cuts a step short: the step ends, ``Preemption`` saves after it,
        and a resume continues with the next batch exactly as an unstopped run would."""
        x, y = batch
        valid = self._valid_batch(x, y, self._train_where())
        y = y.clamp(0, self.num_classes - 1)  # out-of-range labels would crash the cost first
        now = time.perf_counter()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        try:
            estimate = self._estimate(self.network, x, y)
        except DivergenceError as err:
            return self._diverged(err)
        params = list(self.network.parameters())
        self.manual_backward(estimate.surrogate)
        healthy, valid = self._agree(self._healthy(estimate, params), valid)
        if not valid:
            raise self._bad_batch(x, batch[1], self._train_where())
        if not healthy:
            optimizer.zero_grad()
            return self._diverged(DivergenceError(self._diagnose(x, y, estimate)))
        optimizer.step()
        if self.hparams.schedule_interval == "step":
            self.lr_schedulers().step()
        if self.trainer.is_last_batch:
            self._check_after_last_step(x, y, estimate.loss)
        self._log_step(estimate, y, optimizer, now)
        return estimate.loss

    def _check_after_last_step(self, x: Tensor, y: Tensor, loss_before: Tensor) -> None:
        """The weights an epoch ends with are saved right after it, so they are checked first
        (a forward pass, once per epoch): finite, and not raising the step's batch loss more than
        ``LOSS_JUMP``-fold. An exploding step leaves finite weights of ~1e35 whose loss is finite
        but absurd; a healthy step never multiplies its batch's loss by a thousand."""
        self.check_weights("after the epoch's last step")
        with torch.no_grad():
            loss = self.estimator.cost.value(self.network(x), y).mean()
        if not bool(torch.isfinite(loss) & (loss <= LOSS_JUMP * (loss_before.detach() + 1))):
            raise DivergenceError(
                f"training diverged at epoch {self.current_epoch}, step {self.global_step}: the "
                f"weights after the epoch's last step raise the batch loss from "
                f"{loss_before.item():.3g} to {loss.item():.3g} (largest weight "
                f"{max(p.abs().max().item() for p in self.network.parameters()):.3g}); nothing "
                "was saved from this state")

    def _healthy(self, estimate, params: list[Tensor]) -> Tensor:
        """A 0-dim bool on the device: finite loss and gradients, and no slow blow-up (the nudged
        energy E stays below ``max_energy_ratio`` x beta x the free-phase cost)."""
        largest = torch._foreach_norm([p.grad for p in params if p.grad is not None], ord=float("inf"))
        ok = estimate.finite & torch.isfinite(torch.stack(largest)).all()
        ratio = self.hparams.max_energy_ratio
        if self.hparams.algorithm == "ep" and ratio is not None:
            bound = ratio * self.hparams.beta * estimate.stats["C_free"] + 1e-6
            for key in ("E+", "E-"):
                if key in estimate.stats:  # NaN (a sign absent from a random batch) compares False
                    ok = ok & ~(estimate.stats[key] > bound)
        return ok

    def _agree(self, healthy: Tensor, valid: Tensor) -> tuple[bool, bool]:
        """(every rank healthy, every rank's batch valid): one read from the device, and under
        DDP one all-reduce on the CPU."""
        flags = torch.stack([~healthy, ~valid]).to("cpu", torch.int64)
        group = getattr(self, "_flag_group", None)
        if group is not None:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
        sick, bad = flags.tolist()
        return not sick, not bad

    def _valid_batch(self, x: Tensor, y: Tensor, where: str) -> Tensor:
        """What every batch must be, whatever data module made it: integer labels in
        [0, num_classes), one per example, and finite inputs. Shapes and types are checked at once
        (no device read); the values give a 0-dim bool on the device, read with the step's flags."""
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise BadBatch(f"bad {where}: expected a pair of tensors (inputs, labels), got "
                           f"({type(x).__name__}, {type(y).__name__})")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
            raise BadBatch(f"bad {where}: labels must be a vector of integer class indices, got "
                           f"{y.dtype} of shape {list(y.shape)}")
        if len(y) != len(x):
            raise BadBatch(f"bad {where}: {len(x)} inputs but {len(y)} labels")
        return (y >= 0).all() & (y < self.num_classes).all() & torch.isfinite(x).all()

    def _bad_batch(self, x: Tensor, y: Tensor, where: str) -> BadBatch:
        """Why a batch failed ``_valid_batch`` (the rare path: reads the device freely)."""
        problems = []
        outside = (y < 0) | (y >= self.num_classes)
        if bool(outside.any()):
            problems.append(f"{int(outside.sum())} labels outside [0, {self.num_classes}) "
                            f"(min {int(y.min())}, max {int(y.max())})")
        if not bool(torch.isfinite(x).all()):
            problems.append(f"{int((~torch.isfinite(x)).sum())} non-finite input values (NaN or inf)")
        return BadBatch(f"bad {where}: {'; '.join(problems) or 'another rank’s batch was bad'} "
                        "(the data module's data is at fault, not training)")

    def _train_where(self) -> str:
        return f"train batch at epoch {self.current_epoch}, step {self.global_step}"

    def _diagnose(self, x: Tensor, y: Tensor, estimate) -> str:
        """Why the step failed, naming phase and layer (only on this rare path, so the healthy
        path never syncs for it)."""
        if self.hparams.algorithm == "bp":
            return ("non-finite loss at the free state" if not bool(torch.isfinite(estimate.loss))
                    else "non-finite backprop gradient")
        if not bool(estimate.finite):
            return self.estimator.diagnose(self.network, x, y, estimate)
        e = max(float(estimate.stats.get(k, 0.0)) for k in ("E+", "E-"))
        return (f"slow blow-up: the nudged energy E = {e:.3g} exceeds max_energy_ratio "
                f"({self.hparams.max_energy_ratio}) x beta x the free cost "
                f"({float(estimate.stats['C_free']):.3g}); "
                f"{self.estimator.diagnose(self.network, x, y, estimate)} (lower lr or beta, or "
                "raise model.max_energy_ratio)")

    def _log_step(self, estimate, y: Tensor, optimizer, now: float) -> None:
        error = (estimate.logits.argmax(1) != y).float().mean()
        log = {"train/loss": estimate.loss, "lr": optimizer.param_groups[0]["lr"]}
        if self.hparams.algorithm == "ep":
            log.update({"beta": self.hparams.beta, "K": float(self.hparams.K)})
            log.update({f"train/{k}": v for k, v in estimate.stats.items()})
        if self._last_step_start is not None:
            step_time = now - self._last_step_start
            log.update({"step_time_s": step_time, "images_per_s": len(y) / step_time})
        self._last_step_start = now
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(y))
        self.log("train/error", error, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))

    def _diverged(self, err: DivergenceError) -> None:
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        if self.hparams.on_divergence == "stop" or self.skipped_batches >= self.hparams.max_skipped:
            extra = (f" (after skipping {self.skipped_batches} batches)"
                     if self.hparams.on_divergence == "skip" else "")
            raise DivergenceError(f"training diverged at {where}{extra}: {err}")
        self.skipped_batches += 1
        self.log("skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return None

    def check_weights(self, when: str) -> None:
        """Raise ``DivergenceError`` naming the first non-finite parameter (one device read)."""
        params = dict(self.network.named_parameters())
        largest = torch.stack(torch._foreach_norm(list(params.values()), ord=float("inf")))
        if bool(torch.isfinite(largest).all()):  # max |w| per tensor: a sum of squares would overflow
            return
        bad = next(n for n, p in params.items() if not torch.isfinite(p).all())
        raise DivergenceError(f"training diverged at epoch {self.current_epoch}, step "
                              f"{self.global_step}: non-finite weights {when} (parameter {bad}); "
                              "nothing was saved from this state")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Bring a per-epoch schedule to the current epoch, before every step (two integers
        compared): Lightning skips ``on_train_epoch_start`` for an epoch it resumes into, and a
        checkpoint saved before or after an epoch's end must resume on the same learning rate."""
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
        """No checkpoint ever holds non-finite weights; each rank's sign generator is kept; a
        checkpoint saved after an epoch's last step resumes the data at the next epoch's start."""
        if self._trainer is not None and self.trainer.training:
            self.check_weights("before saving a checkpoint")
            if self.trainer.is_last_batch:
                finish_epoch(checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}))
        state = self.signs.get_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["sign_generators"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Each rank takes back its own sign generator (a rank the saved run did not have keeps
        its fresh seed + rank), in ``on_fit_start``."""
        states = checkpoint.get("sign_generators") or (
            [checkpoint["sign_generator"]] if "sign_generator" in checkpoint else [])
        self._restored_signs = states  # applied in on_fit_start, once the generator is on the device
        self._check_resume(checkpoint.get("hyper_parameters", {}))

    def _check_resume(self, saved: dict) -> None:
        """Resuming with another algorithm or EP setting is legal but surprising: one warning."""
        saved = {"pool_routing": "nudged", **saved}  # checkpoints from before the option were nudged
        changed = [f"{k} {saved[k]!r} -> {self.hparams[k]!r}" for k in
                   ("algorithm", "cost", "perturbation", "scheme", "beta", "K", "rule", "order", "alpha",
                    "pool_routing")
                   if k in saved and k in self.hparams and saved[k] != self.hparams[k]]
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if changed and fitting and self.global_rank == 0:
            print("pcn_ep: warning: resuming a checkpoint trained with other settings: "
                  + ", ".join(changed), file=sys.stderr)

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str, batch_idx: int) -> None:
        x, y = batch
        where = f"{split} batch {batch_idx}" + (f" at epoch {self.current_epoch}"
                                                 if self.trainer.state.fn == "fit" else "")
        valid = self._valid_batch(x, y, where)
        # every rank stops on any rank's bad batch: alone, the others would wait at the epoch's
        # metric sync until the process group's timeout (evaluation reads its metrics anyway)
        _, valid = self._agree(torch.ones_like(valid), valid)
        if not valid:
            raise self._bad_batch(x, y, where)
        logits = self.network(x)
        loss = self.estimator.cost.value(logits, y).mean()
        self.log(f"{split}/loss", loss, batch_size=len(y), sync_dist=True)
        for name, metric in self.metrics.items():
            if name.startswith(split):
                metric.update(logits, y)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", batch_idx)

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

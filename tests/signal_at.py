"""A callback that signals its own process at a chosen point of a command, so that a test knows
exactly where the signal landed (no timing): ``trainer.callbacks`` entry
``{class_path: signal_at.SignalAt, init_args: {signal: SIGTERM, at: train, step: 3}}``."""
import os
import signal as signals
import time

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signal`` (``times`` times) to this process ``at``: ``setup``, ``sanity`` (the sanity
    check), ``train`` (in training step ``step``), ``fit_validation`` (the validation inside fit,
    epoch ``step``), ``validate`` or ``test`` (their first batch); under DDP on every rank, or on
    ``rank`` only; then create the file ``marker``, if given. ``signal: null`` sends nothing: the
    run creates ``marker`` there and waits (up to 10 minutes) for a signal from another process,
    so that a test's outside signal lands at a known point however slow the machine is."""

    def __init__(self, signal: str | None, at: str, step: int = 0, times: int = 1,
                 rank: int | None = None, marker: str | None = None) -> None:
        self.signum = getattr(signals, signal) if signal else None
        self.at, self.step, self.times = at, step, times
        self.rank, self.marker, self.sent = rank, marker, False

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer
        self._send("setup")

    def _send(self, at: str) -> None:
        if self.rank is not None and self._trainer.global_rank != self.rank:
            return
        if at == self.at and not self.sent:
            self.sent = True
            for _ in range(self.times if self.signum else 0):
                os.kill(os.getpid(), self.signum)
            if self.marker:  # a state another process can wait for
                open(self.marker, "w").close()
            if self.signum is None:
                from pcn_ep.training.callbacks import STOP

                end = time.monotonic() + 600
                while not STOP.signum and time.monotonic() < end:
                    time.sleep(0.05)

    def on_sanity_check_start(self, trainer, pl_module):
        self._send("sanity")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._send("train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and trainer.current_epoch == self.step:
            self._send("fit_validation")
        elif trainer.state.fn == "validate":
            self._send("validate")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._send("test")

"""Reliability for multi-day runs: checkpoints that are never half-written, and preemption.

- ``AtomicCheckpointIO``: writes a checkpoint to a temporary file in the same folder and renames it
  over the final name, so a crash (SIGKILL, full disk) leaves either the old file or the new one.
- ``PreemptionCheckpoint``: on SIGTERM (or SLURM's pre-timeout signal, which Lightning turns into the
  same request) it saves ``last.ckpt`` right after the current training step; Lightning then stops
  the run, and ``python -m pcn_ep fit ... --ckpt_path last`` continues from that step.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` will look: the ModelCheckpoint folder, else the run's root."""
    callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    folder = callback.dirpath if callback is not None and callback.dirpath else (
        Path(trainer.default_root_dir) / "checkpoints")
    return Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class PreemptionCheckpoint(Callback):
    def __init__(self) -> None:
        self.saved: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and self.saved is None:
            self.saved = last_checkpoint_path(trainer)
            trainer.save_checkpoint(self.saved)

"""Reliability for multi-day runs on preemptible nodes.

- ``AtomicCheckpointIO``: writes a checkpoint to a temporary file in the same folder and renames it
  over the final name, so a crash (SIGKILL, full disk) leaves either the old file or the new one.
- ``LastCheckpoint``: the one writer of ``last.ckpt``, refreshed after every epoch whatever the
  monitored metric did (Lightning 2.6 refreshes ``save_last`` only when a new best is saved); the best
  checkpoint stays with the config's ``ModelCheckpoint``.
- ``Preemption``: SIGTERM and SIGUSR1 (SLURM's pre-timeout signal, ``#SBATCH --signal=SIGUSR1@120``)
  on any rank stop every rank at the same step boundary: the ranks agree through the process group
  after each step, ``last.ckpt`` is written once, the job is requeued under SLURM, and the CLI exits
  143. The nudged phase polls the same flag each iteration, so a huge K cannot hold the stop hostage.
- ``RunFolderLock``: one process per checkpoint folder (an ``flock`` the OS drops when the holder
  dies, so a dead run's lock is taken over); it also clears partial files a killed save left.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as _ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL = ".{name}.partial-{pid}"  # AtomicCheckpointIO's temporary name


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(PARTIAL.format(name=path.name, pid=os.getpid()))
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        except OSError as err:
            kept = "the previous file is intact" if path.exists() else "no earlier file by that name"
            raise CheckpointWriteError(f"could not write checkpoint {path}: "
                                       f"{err.strerror or err} ({kept})") from None
        finally:
            partial.unlink(missing_ok=True)


def checkpoint_folder(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives: the config's ModelCheckpoint folder (where ``--ckpt_path last``
    looks), else ROOT/checkpoints."""
    folders = [c.dirpath for c in trainer.checkpoint_callbacks if c.dirpath]
    return Path(folders[0] if folders else Path(trainer.default_root_dir) / "checkpoints")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    return checkpoint_folder(trainer) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class LastCheckpoint(Callback):
    """``last.ckpt`` = the state after the latest finished epoch, whatever the monitored metric did.

    Saved where Lightning's ModelCheckpoint saves an epoch (after the epoch's validation, or at the
    epoch's end when there is none), so a resume continues exactly as from any Lightning
    checkpoint. The config's ModelCheckpoints keep the best files; their ``save_last`` is turned
    off (one writer per file)."""

    def __init__(self) -> None:
        self._saved_step: int | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        for other in trainer.checkpoint_callbacks:
            other.save_last = False

    def _save(self, trainer) -> None:
        if (trainer.sanity_checking or trainer.state.fn != "fit" or trainer.fast_dev_run
                or self._saved_step == trainer.global_step):
            return
        trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)  # a no-op when the epoch's validation already saved this step


class Preempted(Exception):
    """Raised on every rank after ``last.ckpt`` was written for a stop request."""

    def __init__(self, signum: int, path: Path, requeue: str | None) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after saving {path}"
                         + (f"; {requeue}" if requeue else "")
                         + "; resume with the same command and --ckpt_path last")
        self.signum = signum


class StopRequest:
    """The process's stop flag: set by the signal handler, read between steps and by the nudged
    phase. Signals are per process, so one flag per process is the honest shape."""

    signum: int = 0

    def __call__(self) -> bool:
        return self.signum != 0


STOP = StopRequest()
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def on_signal(signum, frame) -> None:
    STOP.signum = STOP.signum or signum


def requeue_slurm_job() -> str | None:
    """``scontrol requeue`` this job (rank 0, under SLURM only); returns what happened."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({err}); resubmit it"
    if done.returncode:
        return f"scontrol requeue {job} failed ({done.stderr.strip() or done.returncode}); resubmit it"
    return f"SLURM job {job} requeued"


class Preemption(Callback):
    """Catch SIGTERM/SIGUSR1, agree across ranks after each step, save ``last.ckpt``, stop."""

    def __init__(self) -> None:
        self._previous: dict = {}
        self._group = None

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning installed its own handlers (which broadcast from rank 0 only and kill the
        # launcher's children): ours replace them for the training loop, and are restored at the end.
        # a signal that arrived during setup stays set: the first step then saves and stops
        self._previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            # a CPU (gloo) group: agreeing on a flag never waits for the GPU's queue
            self._group = getattr(pl_module, "_flag_group", None) or dist.new_group(backend="gloo")

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed_signal(self) -> int:
        """The stop signal of any rank (0: none), the same on every rank."""
        if self._group is None:
            return STOP.signum
        flag = torch.tensor([STOP.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.agreed_signal()
        if not signum:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # collective: rank 0 writes, all wait
        requeue = None
        if signum == signal.SIGUSR1 and trainer.is_global_zero:
            requeue = requeue_slurm_job()
        raise Preempted(signum, path, requeue)


class RunFolderLock(Callback):
    """One writer per checkpoint folder; leftovers of a killed save are removed at start."""

    def __init__(self) -> None:
        self._file = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """After every setup check passed: a run that fails its checks creates nothing."""
        if not trainer.is_global_zero or self._file is not None:
            return
        folder = checkpoint_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RunFolderBusy(f"{folder} is in use by a running process (PID {holder}); "
                               "give this run another folder (trainer.default_root_dir and the "
                               "checkpoint dirpath) or wait for it to finish") from None
        lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
        self._file = lock
        for partial in folder.glob(PARTIAL.format(name="*", pid="*")):
            partial.unlink(missing_ok=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.release()  # Lightning skips the teardown hooks after an exception

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


class ModelSummary(_ModelSummary):
    """Lightning's model summary without its FLOPs column and total: Lightning counts FLOPs only
    from the module's example input, which this module cannot have (a batch is an (x, y) pair the
    data module transforms on the device), so they would read 0."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size,
                  total_training_modes, total_flops, **summarize_kwargs) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size,
                                      total_training_modes, total_flops, *columns)
        logging.getLogger(_ModelSummary.__module__).info(
            "\n" + "\n".join(l for l in table.splitlines() if not l.endswith("Total Flops")))

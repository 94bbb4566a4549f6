"""Reliability for multi-day runs on preemptible nodes.

- ``AtomicCheckpointIO``: writes a checkpoint to a partial file in the same folder (never through
  ``TMPDIR``, which on a cluster node may be too small for a VGG10 checkpoint and which no run
  would clean) and renames it over the final name, so a crash (SIGKILL, full disk) leaves either the
  old file or the new one, plus at most a ``.partial`` file that the next run removes. It reads
  checkpoints with ``load_checkpoint``: tensors and plain data only, never code.
- ``LastCheckpoint``: the one writer of ``last.ckpt``, refreshed after every epoch whatever the
  monitored metric did (Lightning 2.6 refreshes ``save_last`` only when a new best is saved); the best
  checkpoint stays with the config's ``ModelCheckpoint``.
- ``Preemption``: SIGTERM, SIGUSR1 (SLURM's pre-timeout signal, ``#SBATCH --signal=SIGUSR1@120``),
  SIGHUP and SIGINT on any rank stop every rank at the same step boundary: the ranks agree through
  the process group after each step, ``last.ckpt`` is written once, the job is requeued under SLURM
  (SIGUSR1), and the CLI exits 128 + the signal (143 for SIGUSR1). The step in progress is never
  cut short, so the resume continues exactly where an unstopped run would; a second signal stops
  at once (``StopNow``). Outside training (setup, evaluation) the stop is immediate, as there is
  nothing to save.
- ``LogProgress``: the progress display when stdout is not a terminal (a cluster job's log, a pipe):
  a line per epoch, and within a long epoch one every few minutes, instead of a bar redrawn with
  carriage returns.
- ``RunFolderLock``: one process per checkpoint folder (a POSIX ``lockf`` the OS drops when the holder
  dies, so a dead run's lock is taken over); it also clears partial files a killed save left.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, ProgressBar
from lightning.pytorch.callbacks import ModelSummary as _ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL = ".{name}.partial-{pid}"  # AtomicCheckpointIO's temporary name


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous file is intact."""


class CheckpointError(ValueError):
    """A file given as a checkpoint cannot be used: unreadable, or asking to run code."""


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, loaded as data: ``torch.load(weights_only=True)`` builds tensors,
    numbers, strings and containers and refuses every other object, so a crafted file (a pickle
    whose ``__reduce__`` calls ``os.system``) cannot run code. Our checkpoints hold nothing else,
    so nothing is allow-listed. Every way of failing is one ``CheckpointError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global, or not a pickle at all
        first = str(err).splitlines()[0] if str(err) else ""
        if "GLOBAL" in str(err) or "Unsupported global" in str(err):  # a class or function asked for
            refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line
                       or "GLOBAL" in line]
            raise CheckpointError(
                f"refused to load checkpoint {path}: it holds objects other than tensors and plain "
                f"data, which loading would run as code ({refused[0] if refused else first}); "
                "pcn_ep's checkpoints never do") from None
        raise CheckpointError(f"checkpoint {path} is not readable (truncated or corrupt?): {first}") from None
    except Exception as err:  # truncated, empty, random bytes: torch raises many types
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"checkpoint {path} is not readable (truncated or corrupt?): "
                              f"{type(err).__name__}: {first}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return saved


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(PARTIAL.format(name=path.name, pid=os.getpid()))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:  # beside its destination, so the rename cannot copy
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as err:
            kept = "the previous file is intact" if path.exists() else "no earlier file by that name"
            raise CheckpointWriteError(f"could not write checkpoint {path}: "
                                       f"{err.strerror or err} ({kept})") from None
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Every checkpoint Lightning reads for a command (``--ckpt_path``) goes through here:
        data only, whatever ``weights_only`` the caller asked for."""
        return load_checkpoint(path)


def model_checkpoints(trainer: L.Trainer) -> list[ModelCheckpoint]:
    """The config's ModelCheckpoints (``trainer.checkpoint_callbacks`` also lists ``LastCheckpoint``)."""
    return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]


def checkpoint_folder(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives: the config's ModelCheckpoint folder (where ``--ckpt_path last``
    looks), else ROOT/checkpoints."""
    folders = [c.dirpath for c in model_checkpoints(trainer) if c.dirpath]
    return Path(folders[0] if folders else Path(trainer.default_root_dir) / "checkpoints")


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    return checkpoint_folder(trainer) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` = the state after the latest finished epoch, whatever the monitored metric did.

    Saved where Lightning's ModelCheckpoint saves an epoch (at the epoch's end, after its
    validation; after a validation inside an epoch too), so a resume continues exactly as from any Lightning
    checkpoint. The config's ModelCheckpoints keep the best files; their ``save_last`` is turned
    off (one writer per file). A ``Checkpoint`` so that Lightning runs it after them: the file
    then records the best checkpoint of this very epoch (``--ckpt_path best`` reads it there)."""

    def __init__(self) -> None:
        self._saved_step: int | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        for other in model_checkpoints(trainer):
            other.save_last = False

    def _save(self, trainer) -> None:
        if (trainer.sanity_checking or trainer.state.fn != "fit" or trainer.fast_dev_run
                or self._saved_step == trainer.global_step):
            return
        trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)
        self._saved_step = trainer.global_step
        trainer._pcn_last_saved = (trainer.current_epoch, trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_last_batch:  # a validation inside the epoch (val_check_interval < 1)
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)  # after the ModelCheckpoints' own end-of-epoch save


class Preempted(Exception):
    """A stop request (a signal) ended the command, on every rank; the message says what is on disk."""

    def __init__(self, signum: int, saved: str, requeue: str | None = None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {saved}"
                         + (f"; {requeue}" if requeue else ""))
        self.signum = signum


class StopNow(BaseException):
    """A second signal (Ctrl-C twice): stop at once, wherever the command is (a ``BaseException``, as
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it)."""


class StopRequest:
    """The process's stop flag: set by the signal handler, read between steps. Signals are per
    process, so one flag per process is the honest shape."""

    signum: int = 0


STOP = StopRequest()
# SIGTERM: a scheduler or kill; SIGUSR1: SLURM's warning before a time limit (--signal=SIGUSR1@120);
# SIGHUP: the terminal went away (a closed SSH session); SIGINT: Ctrl-C
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)


def exit_code(signum: int) -> int:
    """128 + the signal, the shell's convention, except SIGUSR1: SLURM's warning is a SIGTERM
    that comes early, and schedulers and ``reproduce`` read 143 as "stopped, resume me"."""
    return 143 if signum == signal.SIGUSR1 else 128 + signum


def on_signal(signum, frame) -> None:
    if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail (EIO) mid-step
        for fd in (1, 2):
            if os.isatty(fd):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)
    if STOP.signum:  # a second signal (Ctrl-C twice): stop now, wherever the command is
        stop = StopNow(f"stopped at once by a second signal ({signal.Signals(signum).name}; the "
                       f"first was {signal.Signals(STOP.signum).name})")
        stop.signum = signum
        raise stop
    STOP.signum = signum


def take_signals() -> None:
    """Make ``on_signal`` the handler of every stop signal (Lightning installs its own SIGTERM
    handler at the start of each ``fit``/``validate``/``test``; it would end an evaluation with
    exit 0). Lightning puts the process's previous handlers back at the end of the command."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, on_signal)


def on_disk(trainer: L.Trainer) -> str:
    """What ``last.ckpt`` holds now, in words, for a stop message."""
    path = last_checkpoint_path(trainer)
    if not path.exists():
        return "no checkpoint on disk"
    saved = getattr(trainer, "_pcn_last_saved", None)
    when = f" (epoch {saved[0]}, step {saved[1]})" if saved else ""
    return f"last checkpoint on disk: {path}{when}"


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
    """Every stop signal, wherever the command is, on every rank at once (the ranks agree on the
    flag through a CPU process group):

    - in training: after the current step (never cut short), with ``last.ckpt`` saved there, the
      data loader's position included, so a resume continues exactly as an unstopped run;
    - during the validation inside ``fit``: that validation ends, the next step runs, then the
      same save and stop;
    - during setup's sanity check, ``validate``, ``test`` and the test after ``fit``: at once, as
      nothing is left to save.

    A second signal stops at once wherever the command is (``on_signal`` raises ``StopNow``).
    """

    def __init__(self) -> None:
        self._group = None

    def _start(self, trainer, pl_module) -> None:
        take_signals()
        if self._group is None and dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            # a CPU (gloo) group: agreeing on a flag never waits for the GPU's queue
            self._group = getattr(pl_module, "_flag_group", None) or dist.new_group(backend="gloo")

    def agreed_signal(self) -> int:
        """The stop signal of any rank (0: none), the same on every rank."""
        if self._group is None:
            return STOP.signum
        flag = torch.tensor([STOP.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module)
        self._stop_evaluation(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """After a step, whenever the stop came (during the step, loading its batch, the
        validation that ended the previous epoch): the state and the data position are saved
        together, so the resume takes the next batch."""
        signum = self.agreed_signal()
        if not signum:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # collective: rank 0 writes, all wait
        # Lightning logs a step's metrics after this hook: log them here, or the stopped step
        # would be the one hole in the run's history (CSV and W&B alike)
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        trainer._pcn_last_saved = (trainer.current_epoch, trainer.global_step)
        requeue = None
        if signum == signal.SIGUSR1 and trainer.is_global_zero:
            requeue = requeue_slurm_job()
        raise Preempted(signum, f"after saving {path} (epoch {trainer.current_epoch}, step "
                                f"{trainer.global_step}); the same command with --ckpt_path last "
                                "continues from the next batch, as if never stopped", requeue)

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            self._stop_evaluation(trainer)

    def on_test_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._stop_evaluation(trainer)

    def _stop_evaluation(self, trainer) -> None:
        signum = self.agreed_signal()
        if not signum:
            return
        if trainer.sanity_checking:
            raise Preempted(signum, f"before training started: {on_disk(trainer)}")
        if getattr(trainer, "_pcn_after_fit", False):
            raise Preempted(signum, f"during the test that follows fit: training had finished and "
                                    f"{last_checkpoint_path(trainer)} holds its final weights; "
                                    "rerun the same command with --ckpt_path last to test them")
        stage = "test" if trainer.state.fn == "test" else "validate"
        raise Preempted(signum, f"during {stage}: nothing to save ({stage} only reads the weights)")


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
            # lockf, not flock: a process's POSIX lock is not shared with the data loader workers it
            # forks, so a stopped run's folder is free as soon as the run has ended
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
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
            self._file.close()  # closing drops the lock
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


class LogProgress(ProgressBar):
    """Progress for a log file: the CLI's display when stdout is not a terminal (on one, Lightning's
    bar). One line per training epoch with its time and the metrics the bar would show, e.g.
    ``epoch 2 (3 of 30): 90 steps in 4.1 s, train/error 0.0625, val/top1_error 0.0222``; within an
    epoch, a line every ``every_n_steps`` steps and at most ``every_n_seconds`` apart, so that a
    long epoch (hours on ImageNet) still shows its pace; one line per evaluation outside ``fit``.
    Plain lines, flushed, never a carriage return.

    Args:
        every_n_steps: a line every this many training steps within an epoch; null: none.
        every_n_seconds: a line within an epoch once this many seconds have passed since the
            last one; null: none.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_seconds: float | None = 300.0) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self._enabled = True
        self._started = self._last = self._eval_started = 0.0
        self._steps = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, text: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        print(f"{text}{', ' + shown if shown else ''}", flush=True)
        self._last = time.monotonic()

    def _epoch(self, trainer: L.Trainer) -> str:
        """``epoch 7 (8 of 30)``: numbered from 0 as in Lightning, the checkpoints and the CSV."""
        epoch = trainer.current_epoch
        total = f" of {trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {epoch} ({epoch + 1}{total})"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = self._last = time.monotonic()
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if not self._enabled:
            return
        done, now = batch_idx + 1, time.monotonic()
        if done >= self.total_train_batches:
            return  # the epoch's own line follows
        if ((self.every_n_steps and done % self.every_n_steps == 0)
                or (self.every_n_seconds is not None and now - self._last >= self.every_n_seconds)):
            total = self.total_train_batches
            of = f"/{total}" if isinstance(total, int) else ""
            self._line(f"{self._epoch(trainer)}: step {done}{of}, {now - self._started:.1f} s",
                       trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self._line(f"{self._epoch(trainer)}: {self._steps} steps in "
                       f"{time.monotonic() - self._started:.1f} s", trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_started = time.monotonic()

    on_test_start = on_validation_start

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.sanity_checking and trainer.state.fn != "fit":
            print(f"validation: {self.total_val_batches:g} batches in "
                  f"{time.monotonic() - self._eval_started:.1f} s", flush=True)

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled:
            print(f"test: {sum(trainer.num_test_batches):g} batches in "
                  f"{time.monotonic() - self._eval_started:.1f} s", flush=True)

"""The loggers of a run folder: one run, one history, however often the run is stopped and resumed.

Where a run's history goes (``pcn_ep.training.loggers.CSVLogger`` and ``WandbLogger``, as every
config names them; ``save_dir`` is the run folder, ``trainer.default_root_dir``):

- **CSV**: one file, ``SAVE_DIR/NAME/metrics.csv`` (the configs: ``runs/CONFIG/seedS/csv/
  metrics.csv``; ``name: ""`` puts it in the run folder itself), never a ``version_N/`` folder.
  Every command of the run folder appends to it: ``fit``, each ``fit --ckpt_path last`` (its steps
  go on from the checkpoint's), the test that follows ``fit``, and a separate ``validate`` or
  ``test``. Earlier rows are kept and a new column extends the header. A ``fit`` first drops the
  rows of the steps it trains again: those logged after its checkpoint was saved, by a run that was
  killed (SIGKILL, a crash, a lost node; a stop by a signal saves after its last logged step, so
  nothing is dropped), or the whole history of a folder trained again from the beginning (``fit``
  without ``--ckpt_path``). So the training rows' steps never go back, however the run stopped.
  A separate ``validate``/``test`` writes its rows at the global step of the checkpoint it
  evaluates (with ``--ckpt_path last``: the run's last step), without an epoch. ``hparams.yaml``
  and the CLI's ``config.yaml`` beside the file are the last command's.
- **W&B**: one W&B run per run folder. Its id is drawn by the folder's first command that logs and
  kept in ``SAVE_DIR/wandb/run_id.txt``; every later command of the folder (a resume, a separate
  ``validate`` or ``test``) continues that run: ``wandb.init(id=..., resume="allow")``. The test
  after ``fit`` is part of its ``fit``. An ``id`` (or ``version``) in the config wins over the file.
  Offline, each command leaves one folder ``wandb/offline-run-TIME-ID``: ``wandb sync
  SAVE_DIR/wandb/offline-run-*`` uploads the folders of one id into one W&B run, in order of start
  time, and ``python -m pcn_ep report`` reads them as one run. Training rows carry
  ``trainer/global_step`` (the x axis: it goes on from the checkpoint's step); rows of a separate
  ``validate``/``test`` carry the evaluated checkpoint's step and no epoch. The summary's
  ``run/status`` is the status of the last ``fit`` (ok, diverged, failed, stopped); a separate
  ``validate``/``test`` writes ``run/validate_status`` / ``run/test_status`` instead, so
  evaluating a stopped run never makes it read ``ok``. W&B cannot drop rows: after a kill, the
  rows of the lost steps stay in the W&B run beside the resume's (an exact resume logs the same
  values again).

Lightning's own ``CSVLogger`` and ``WandbLogger`` keep their behaviour: a new ``version_N/`` and a
new W&B run for every command.
"""
from __future__ import annotations

import csv
import io
import netrc
import os
import re
import secrets
import string
import struct
import sys
import time
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..files import write_text_atomically

EVALUATIONS = ("validate", "test")   # commands that evaluate the run as it stands
RUN_ID_FILE = "run_id.txt"           # in SAVE_DIR/wandb/: the W&B run id of the run folder
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
FINISH_GUARD_S = 300.0               # how long close() waits for W&B's writer before it warns


def wandb_key_configured() -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.exists() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_offline() -> bool:
    """Offline unless an API key is configured and ``WANDB_MODE`` does not ask for offline."""
    mode = os.environ.get("WANDB_MODE", "")
    return mode in ("offline", "dryrun", "disabled") or not wandb_key_configured()


# -- CSV -----------------------------------------------------------------------------------------
def _step_of(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def _evaluation_row(row: dict) -> bool:
    """A row of validation or test metrics only (not of a training step)."""
    values = [k for k, v in row.items() if v not in (None, "") and k not in ("step", "epoch")]
    return bool(values) and all(str(k).startswith(("val/", "test/")) for k in values)


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer, except that an existing ``metrics.csv`` is continued: Lightning 2.6
    deletes it when the writer starts ("Previous log files in this directory will be deleted")."""

    def _check_log_dir_exists(self) -> None:
        """(Lightning's hook at start.) Read the existing file's header, so that a new column
        rewrites the file with every earlier row; a row cut off by a kill (no final newline) is
        dropped, so that the next row does not continue it."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if text and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        header = next(csv.reader(io.StringIO(text)), [])
        if header:
            self.metrics_keys = list(header)
        else:  # empty: written anew, header first
            path.unlink()

    def rewind(self, step: int) -> None:
        """Drop the rows of the steps training starts again from ``step`` on: Lightning logs a
        training step's row at the number of steps done before it, so a checkpoint after ``step``
        steps holds the rows up to ``step - 1``, and the evaluation rows at ``step`` (the test
        after a finished fit)."""
        self.save()
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))

        def lost(row: dict) -> bool:
            at = _step_of(row)
            return at is not None and (at > step or at == step and not _evaluation_row(row))

        if not any(map(lost, rows)):
            return
        kept = io.StringIO()
        writer = csv.DictWriter(kept, fieldnames=self.metrics_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for row in rows if not lost(row))
        write_text_atomically(path, kept.getvalue())


class CSVLogger(_CSVLogger):
    """Lightning's ``CSVLogger`` keeping one history per run folder: ``SAVE_DIR/NAME/metrics.csv``,
    appended to by every command (see the module's rules; nothing is deleted but the rows of lost
    steps).

    Args:
        save_dir: The run folder (the configs: ``${trainer.default_root_dir}``).
        name: The subfolder of ``save_dir`` holding ``metrics.csv`` (``""``: ``save_dir`` itself).
        version: ``""`` (default): no version folder, one history per run folder; a name: that
            subfolder; ``None``: Lightning's ``version_N``, a new one for every command.
        prefix: A string put at the beginning of every metric's name.
        flush_logs_every_n_steps: How often Lightning's writer flushes (the CLI flushes every row).
    """

    def __init__(self, save_dir: str, name: str | None = "csv", version: int | str | None = "",
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.command = "fit"        # set by the CLI (bind_loggers)
        self.evaluated_step = 0     # validate/test: the global step of the checkpoint evaluated
        self.training_starts_at = None  # fit: the step training starts from, asked at the first row

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if self.command in EVALUATIONS:  # its loops count from 0: the checkpoint's step instead,
            step = self.evaluated_step  # and no epoch (it trained none)
            metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        elif self.training_starts_at is not None:  # the first row of a fit's training
            self.experiment.rewind(self.training_starts_at())
            self.training_starts_at = None
        super().log_metrics(metrics, step)


# -- W&B -----------------------------------------------------------------------------------------
def read_run_id(save_dir: str | Path) -> str | None:
    """The W&B run id kept in ``SAVE_DIR/wandb/run_id.txt`` (``None``: no run logged there yet);
    a file that does not hold an id is one error naming it."""
    path = Path(save_dir) / "wandb" / RUN_ID_FILE
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip() if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        text = None
    if text is None or not RUN_ID.fullmatch(text):
        raise ValueError(f"{path} should hold the run folder's W&B run id (letters, digits, - "
                         "and _) but does not; remove it and this run folder's next command "
                         "starts a new W&B run")
    return text


def _write_run_id(save_dir: str | Path, run_id: str) -> None:
    folder = Path(save_dir) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / RUN_ID_FILE, run_id + "\n")


_BLOCK = 32768  # a .wandb file is a LevelDB-style log: 32 KiB blocks of chunks, 7-byte headers


def transaction_log_finished(path: str | Path) -> bool:
    """Whether W&B's ``run-ID.wandb`` file ends with the run's exit record: W&B writes it last,
    when the run's stream closes and its buffer is flushed (``finish()`` returns before that: the
    writer is W&B's separate service process). Only the file's tail is read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            block = max(size - 1, 0) // _BLOCK
            while block >= 0:   # from the last block back to the one where its first record begins
                start = max(block * _BLOCK, 7)   # block 0 begins with the 7-byte file header
                f.seek(start)
                last = _last_record(f.read(size - start), start)
                if last is not _CONTINUED:
                    if last is None:
                        return False
                    from wandb.proto import wandb_internal_pb2

                    record = wandb_internal_pb2.Record()
                    record.ParseFromString(last)
                    return record.WhichOneof("record_type") == "exit"
                block -= 1
    except (OSError, ValueError, struct.error):   # protobuf's DecodeError is a ValueError
        return False
    return False


_CONTINUED = object()


def _last_record(data: bytes, start: int):
    """The last whole record of a .wandb file's tail ``data`` (from file offset ``start``, a block
    boundary); ``None`` when the tail ends inside a record; ``_CONTINUED`` when it begins inside
    one (read from the block before)."""
    pos, end, chunk, last = start, start + len(data), b"", None
    while pos + 7 <= end:
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos - start:pos - start + 7])
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        if pos == start and kind in (3, 4):  # MIDDLE or LAST: the record began earlier
            return _CONTINUED
        if pos + 7 + length > end:
            return None  # a chunk still being written
        chunk += data[pos - start + 7:pos - start + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            last, chunk = chunk, b""
    return None if chunk else last


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger`` with ``offline`` decided for you, quiet, started late, and one
    W&B run per run folder (see the module's rules).

    ``offline=None`` (default): online when an API key is configured and ``WANDB_MODE`` does not say
    otherwise, else offline (a local run folder under ``save_dir/wandb``; ``wandb sync`` uploads it
    later). Project, group and tags come from the config, e.g. group = the paper table, tags = the cell.

    W&B prints nothing (the CLI's summary names the run folder and URL), and the W&B run starts with
    the first thing logged, after the setup checks: a config or data error leaves no empty run.
    ``close`` writes the command's own exit status into its summary and returns once W&B has
    written the run's file to the end.
    """

    def __init__(
        self,
        project: str = "pcn-ep",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        **kwargs,
    ) -> None:
        if offline is None:
            offline = wandb_offline()
        if kwargs.get("settings") is None:  # jsonargparse passes wandb.init's defaults (None)
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True)
        # Absolute: W&B's service process resolves a relative folder against its own working
        # directory, that of the first process that started it (children reuse it).
        save_dir = os.path.abspath(save_dir)
        super().__init__(project=project, name=name, group=group, tags=tags, save_dir=save_dir,
                         offline=offline, **kwargs)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb: passing it only warns
        self.run_config: dict | None = None  # the whole resolved config (set by the CLI)
        self.command = "fit"        # set by the CLI (bind_loggers)
        self.evaluated_step = 0     # validate/test: the global step of the checkpoint evaluated
        self._begun = False

    @property
    def experiment(self):
        """The W&B run; ``None`` until something is logged (Lightning asks for it before the
        setup checks only to create it early). It is the run folder's W&B run: the id kept in
        ``SAVE_DIR/wandb/run_id.txt``, drawn and kept there by the folder's first run."""
        if self._experiment is None and not self._begun:
            return None
        if self._experiment is None and rank_zero_only.rank == 0:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            if not self._wandb_init.get("id"):
                run_id = read_run_id(self.save_dir)
                if run_id is None:  # as W&B draws ids: 8 lowercase letters and digits
                    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                     for _ in range(8))
                    _write_run_id(self.save_dir, run_id)
                self._wandb_init["id"] = self._id = run_id
        return super().experiment

    def log_metrics(self, metrics, step=None) -> None:
        self._begun = True
        if self.command in EVALUATIONS:  # its loops count from 0: the checkpoint's step instead,
            step = self.evaluated_step  # and no epoch (it trained none)
            metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        super().log_metrics(metrics, step)

    def close(self, status: str) -> None:
        """Finish the W&B run with the command's own status in its summary (``run/status`` for
        ``fit``: ok, diverged, failed, or stopped by a signal, to be resumed; ``run/test_status``
        or ``run/validate_status`` for those commands; the report reads ``run/status``, since
        W&B's exit code is 0 even for a failed run). Returns once the run's ``.wandb`` file holds
        everything, its exit record last: ``finish()`` alone returns while W&B's service process
        may still hold the last records (the summary with the status among them) in its buffer."""
        if self._experiment is None:
            return
        command = getattr(self, "command", "fit")
        key = "run/status" if command not in EVALUATIONS else f"run/{command}_status"
        self._experiment.summary[key] = status
        try:
            log = Path(self._experiment.settings.sync_file)
        except (AttributeError, TypeError):  # a disabled run writes no file
            log = None
        self._experiment.finish(exit_code=0 if status == "ok" else 1)
        if log is not None and log.exists():
            wait_until_written(log)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The module's hyperparameters, plus the whole resolved run config under ``run`` (network,
        data, trainer): a W&B run then says what produced it, not only β and K."""
        self._begun = True
        if self.run_config is not None:
            params = {**dict(params), "run": self.run_config}
        super().log_hyperparams(params, *args, **kwargs)


def wait_until_written(log: Path, guard_s: float = FINISH_GUARD_S) -> bool:
    """Wait until W&B's service has written ``log`` to its end (its exit record). ``guard_s`` only
    keeps a dead service from hanging the command: then one warning line, and ``False``."""
    deadline = time.monotonic() + guard_s
    while not transaction_log_finished(log):
        if time.monotonic() > deadline:
            print(f"pcn_ep: warning: W&B has not finished writing {log} after {guard_s:.0f} s; "
                  "its last records (the run's status) may be missing", file=sys.stderr)
            return False
        time.sleep(0.02)
    return True


# -- the CLI's side ------------------------------------------------------------------------------
class _History(Callback):
    """What pcn_ep's loggers learn from the command: the step a ``fit`` starts training from (the
    CSV history drops the rows of later steps then), and the global step of the checkpoint a
    ``validate``/``test`` evaluates (its rows are logged there)."""

    def __init__(self, loggers: list, command: str) -> None:
        self.loggers, self.command = loggers, command

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        step = checkpoint.get("global_step")
        if self.command in EVALUATIONS and isinstance(step, int) and not isinstance(step, bool):
            for logger in self.loggers:
                logger.evaluated_step = step

    def on_train_start(self, trainer, pl_module) -> None:
        """Asked at the CSV logger's first row, once the epoch loop has started: Lightning counts
        a step saved at its end (a stop's checkpoint) only then. A training step's row is logged
        at the number of steps done before it."""
        for logger in self.loggers:
            if isinstance(logger, CSVLogger):
                loop = trainer.fit_loop.epoch_loop
                logger.training_starts_at = lambda: loop._batches_that_stepped


def bind_loggers(trainer, command: str) -> None:
    """Tell pcn_ep's loggers which command runs (``fit``, ``validate``, ``test``; the test after
    ``fit`` is part of ``fit``) and where it starts, and check the run folder's W&B id file before
    anything runs."""
    ours = [lg for lg in trainer.loggers if isinstance(lg, (CSVLogger, WandbLogger))]
    for logger in ours:
        logger.command = command
        if isinstance(logger, WandbLogger) and not logger._wandb_init.get("id"):
            read_run_id(logger.save_dir)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, _History)]
    if ours:
        trainer.callbacks.append(_History(ours, command))

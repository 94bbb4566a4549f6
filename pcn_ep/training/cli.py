"""``python -m pcn_ep fit|validate|test [--config FILE] [overrides]``: LightningCLI over the module.

Without ``--config`` the embedded default (``pcn_ep/configs/quickstart.yaml``, shipped inside the
package) is used, so a fresh install trains a real PCN on scikit-learn's digits with no download.
Configuration errors (an unknown key, an impossible value) end with one error line and exit 1 or 2.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from importlib.resources import files
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..core import DivergenceError
from .callbacks import (SIGNALS, STOP, CheckpointWriteError, Preempted, RunFolderBusy, on_signal,
                        last_checkpoint_path)
from .loggers import WandbLogger as PCNWandbLogger
from .module import PCNEPModule

SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_CONFIG = files("pcn_ep") / "configs" / "quickstart.yaml"


class PCNCLI(LightningCLI):
    def __init__(self, args: list[str], run: bool = True) -> None:
        super().__init__(
            PCNEPModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"plugins": [{"class_path": "pcn_ep.training.callbacks.AtomicCheckpointIO"}]},
            parser_kwargs={"allow_abbrev": False, "exit_on_error": False},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="evaluate the final weights on the test split after fit")

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI would overwrite the config's model settings with those stored in a
        ``--ckpt_path`` file (but not with ``last``): here the config always decides, and a resume
        with other settings prints one warning (``PCNEPModule._check_resume``)."""

    def before_fit(self) -> None:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs == 0:
            raise ValueError("trainer.max_epochs is 0: nothing would be trained (use `test` to "
                             "evaluate a checkpoint)")
        check_checkpoint(self.config[self.subcommand].ckpt_path, self.trainer, self.model)
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_check=True))[self.subcommand]
        for logger in self.trainer.loggers:
            if isinstance(logger, PCNWandbLogger):
                logger.run_config = resolved  # logged with the hyperparameters at fit start

    def before_validate(self) -> None:
        check_checkpoint(self.config[self.subcommand].ckpt_path, self.trainer, self.model)

    before_test = before_validate

    def after_fit(self) -> None:
        """The paper reports the error after the last epoch: test the final weights."""
        if self.config[self.subcommand].test_after_fit and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        print_summary(self.trainer)

    def after_test(self) -> None:
        print_summary(self.trainer)


def print_summary(trainer: L.Trainer) -> None:
    """What a finished command leaves behind, in a few lines: the test error and where the
    checkpoints, the CSV metrics and the W&B run folder are."""
    if not trainer.is_global_zero:
        return
    metrics = trainer.callback_metrics
    errors = [f"{name.split('/')[1].replace('_error', '')} {100 * float(metrics[name]):.2f}%"
              for name in ("test/top1_error", "test/top5_error") if name in metrics]
    lines = [f"test error: {', '.join(errors)}"] if errors else []
    best = [c.best_model_path for c in trainer.checkpoint_callbacks if c.best_model_path]
    last = last_checkpoint_path(trainer)
    lines += [f"best checkpoint: {best[0]}"] if best else []
    lines += [f"last checkpoint: {last}"] if last.exists() else []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f"metrics (CSV): {Path(logger.log_dir) / 'metrics.csv'}")
        elif isinstance(logger, WandbLogger) and logger._experiment is not None:
            lines.append(f"W&B run folder: {Path(logger.experiment.dir).parent}")
    if lines:
        print("\n".join(["pcn_ep: done.", *[f"  {line}" for line in lines]]))


def check_checkpoint(ckpt_path: str | None, trainer: L.Trainer, model: L.LightningModule) -> None:
    """Before anything runs: ``--ckpt_path`` names a readable checkpoint of this network."""
    if ckpt_path in (None, "best", "hpc", "registry"):
        return
    path = last_checkpoint_path(trainer) if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path == "last" and not path.exists():
        return  # a first run with --ckpt_path last starts fresh (Lightning warns)
    if path.is_dir():
        raise ValueError(f"--ckpt_path {path} is a folder, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, empty, random bytes: torch raises many types
        raise ValueError(f"--ckpt_path {path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict)")
    ours, theirs = model.state_dict(), saved["state_dict"]
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ValueError(f"--ckpt_path {path} does not fit this network: it has no {missing[0]} "
                         f"({len(missing)} tensors missing; another architecture?)")
    for key, value in ours.items():
        if tuple(theirs[key].shape) != tuple(value.shape):
            raise ValueError(f"--ckpt_path {path} does not fit this network: {key} has shape "
                             f"{list(theirs[key].shape)} in the file, {list(value.shape)} in the network")


def one_line(err: BaseException) -> str:
    """An exception as one line; a DataLoader worker's re-raised error keeps its own message."""
    text = str(err)
    if "Original Traceback" in text:  # "Caught X in DataLoader worker ... Traceback ... X: message"
        text = text.strip().splitlines()[-1].partition(": ")[2] or text
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loading that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists and is YAML without duplicate keys."""
    for flag, value in zip(argv, argv[1:] + [""]):
        path = value if flag in ("-c", "--config") else (
            flag.partition("=")[2] if flag.startswith("--config=") else None)
        if not path:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path}: {' '.join(str(err).split())}") from None


def main(argv: list[str]) -> int:
    """``fit|validate|test [options]`` (``python -m pcn_ep`` routes the other commands)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"pcn_ep: error: expected one of {', '.join(SUBCOMMANDS)} (python -m pcn_ep --help "
              "lists every command)", file=sys.stderr)
        return 2
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    STOP.signum = 0
    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}  # a stop before training starts
    try:
        check_config_files(argv)
        cli = PCNCLI(argv)
    except argparse.ArgumentError as err:  # unknown or misspelt key, wrong type, missing file
        print("pcn_ep: error: " + " ".join(l.strip() for l in str(err).splitlines()), file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"pcn_ep: {stop}", file=sys.stderr)
        return 143
    except (ValueError, FileNotFoundError, DivergenceError, MisconfigurationException,
            CheckpointWriteError, RunFolderBusy, ImportError) as err:
        print(f"pcn_ep: error: {one_line(err)}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if STOP.signum:  # a signal outside training (setup, validation-only, test): nothing to save
        print(f"pcn_ep: stopped by {signal.Signals(STOP.signum).name}", file=sys.stderr)
        return 143
    finish_wandb(cli.trainer)
    return 0


def finish_wandb(trainer: L.Trainer) -> None:
    """Close W&B runs so the run folder holds its summary when the command returns (in-process
    callers, tests) and not only at interpreter exit."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()

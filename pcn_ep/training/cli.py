"""``python -m pcn_ep fit|validate|test [--config FILE] [overrides]``: LightningCLI over the module.

Without ``--config`` the embedded default (``pcn_ep/configs/quickstart.yaml``, shipped inside the
package) is used, so a fresh install trains a real PCN on scikit-learn's digits with no download.
Configuration errors (an unknown key, an impossible value) end with one error line and exit 1 or 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from importlib.resources import files

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..core import DivergenceError
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

    def after_fit(self) -> None:
        """The paper reports the error after the last epoch: test the final weights."""
        if self.config[self.subcommand].test_after_fit and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m pcn_ep {{{','.join(SUBCOMMANDS)},gradcheck,parity,bench,write-ffcv,energy,reproduce,report}} [--config FILE] ...")
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"pcn_ep: error: unknown command {argv[0]!r}; choose one of "
              f"{', '.join(SUBCOMMANDS)}, gradcheck, parity, bench, write-ffcv, energy, reproduce, report", file=sys.stderr)
        return 2
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        cli = PCNCLI(argv)
    except argparse.ArgumentError as err:  # unknown or misspelt key, wrong type, missing file
        print("pcn_ep: error: " + " ".join(l.strip() for l in str(err).splitlines()), file=sys.stderr)
        return 2
    except SIGTERMException:
        print("pcn_ep: stopped by SIGTERM after saving last.ckpt; resume with the same command and "
              "--ckpt_path last", file=sys.stderr)
        return 143
    except (ValueError, FileNotFoundError, DivergenceError, MisconfigurationException) as err:
        print(f"pcn_ep: error: {err}", file=sys.stderr)
        return 1
    finish_wandb(cli.trainer)
    return 0


def finish_wandb(trainer: L.Trainer) -> None:
    """Close W&B runs so the run folder holds its summary when the command returns (in-process
    callers, tests) and not only at interpreter exit."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()

"""What ``reproduce``, ``report`` and ``wandb_report`` share about a results root.

The root's marker and how to read it, where the runs' configs live, the names the tables and
figures give metrics and labels, and the checks on what is read from and written to a root. It
imports none of the three, so their imports run one way: ``reproduce`` → ``report`` →
``wandb_report`` → ``results`` (each may also read this module directly); a cycle would make each
module's meaning depend on which one was imported first.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..shipped import CONFIGS   # the configs shipped in the package, which the runs use
from .tables import TABLES

MARKER = ".pcn_ep-results.json"   # reproduce writes it in each results root: {"smoke": bool}


class Unreadable(ValueError):
    """A run's file that cannot be read as a run: the run is skipped with a warning naming it."""


# What reading one run's files may raise; the report turns each into a warning and skips the run.
READ_ERRORS = (OSError, ValueError, csv.Error, RecursionError)


def warn(message: str) -> None:
    print(f"pcn_ep: warning: report: {message}".replace("\n", "\\n"), file=sys.stderr)


def show(value) -> str:
    """A value read from a file, short enough for one line of a warning."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def why(err: Exception) -> str:
    """One line on what is wrong with a file."""
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(err, json.JSONDecodeError):
        return f"not JSON ({err})"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err)


def read_file(path: Path, binary: bool = False):
    """A file's content. Only a regular file is read: a FIFO or device in its place would block
    the reader, a folder would fail it."""
    if not path.is_file():
        raise Unreadable(f"{path} is not a regular file")
    return path.read_bytes() if binary else path.read_text(encoding="utf-8")


def root_kind(results: Path, warn=warn) -> bool | None:
    """What ``reproduce`` wrote the root for: True smoke, False real, None unmarked (or a marker
    that is not reproduce's, with a warning: the runs' own smoke flags then decide)."""
    marker = results / MARKER
    if not marker.exists():
        return None
    try:
        kind = json.loads(read_file(marker))
    except READ_ERRORS as err:
        kind = why(err)
    if isinstance(kind, dict) and isinstance(kind.get("smoke"), bool):
        return kind["smoke"]
    warn(f"{marker}: not reproduce's marker ({show(kind)}); the runs' own smoke flags decide")
    return None


def output_path(out: Path, name: str) -> Path:
    """``out/name``, refused (``ValueError``) unless it resolves to a file directly inside ``out``:
    names from run files are plain names already (``report.checked``); this also refuses a symlink
    planted at the destination, which would make the report write wherever it points."""
    path = out / name
    if path.resolve().parent != out.resolve():
        raise ValueError(f"{path} leads outside {out} (to {path.resolve()}); the report writes "
                         "only inside --out")
    return path


SMOKE_BANNER = ("SMOKE RUNS (--smoke: digits, 1/16-width nets, 2 epochs): a pipeline check, "
                "not comparable with the paper's numbers")
WORDS = {"val/top1_error": "Validation top-1 error (%)", "val/top5_error": "Validation top-5 error (%)",
         "train/error": "Training error (%)", "test/top1_error": "Test top-1 error (%)",
         "test/top5_error": "Test top-5 error (%)", "beta": "β (nudge strength)",
         "K": "K (nudge iterations)", "alpha": "α (update step)", "scheme": "Finite-difference scheme",
         "method": "Method", "dataset": "Data set", "order": "Traversal", "cost": "Cost",
         "output_gain": "Output-layer init gain", "batch_size": "Batch size", "model": "Network",
         "rule": "Rule", "fidelity/min_cosine": "Gradient cosine, EP vs backprop (worst tensor)",
         "fidelity/max_rel_err": "Relative error, EP vs backprop (worst tensor)"}
# What the GradientFidelity callback logs that the report draws (pcn_ep/training/fidelity.py).
FIDELITY = ("fidelity/min_cosine", "fidelity/max_rel_err")
DEFAULT_CURVES = ("val/top1_error", "val/top5_error")
# Training-curve figures: (panel per value of this label, metrics plotted); the default is one
# panel each for validation top-1 and top-5.
CURVES = {"table_costs": ("dataset", ("val/top1_error",)),
          "table_pgd": ("dataset", ("val/top1_error",)),
          "fig_batch_size": (None, ("val/top1_error", "train/error"))}


def words(key: str) -> str:
    return WORDS.get(key, key)


def title_of(table: str) -> str:
    return TABLES[table].title if table in TABLES else table


def curve_metrics(table: str) -> tuple[str, ...]:
    """The metrics a training-curve table's figure (and its W&B panels) draw."""
    return CURVES.get(table, (None, DEFAULT_CURVES))[1]

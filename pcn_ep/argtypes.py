"""argparse ``type=`` functions that bound the numbers and paths the commands outside Lightning's
CLI read (gradcheck, bench, energy, parity, reproduce): an impossible value is refused while the
flags are parsed, before any work, as one ``pcn_ep: error: COMMAND: argument --FLAG: ...`` line
(``commandline.CommandParser``), exit 2. A shared leaf: it imports no pcn_ep module."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are 32-bit


def int_at_least(low: int):
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
classes = int_at_least(2)  # a classifier needs two classes


def seed(text: str) -> int:
    value = nonneg_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed in 0..{MAX_SEED}, got {text!r}")
    return value


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def real(text: str) -> float:
    """A number, not NaN (±inf allowed: a threshold that never triggers)."""
    value = _float(text, "a number")
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """A number >= 0 (inf allowed: no bound)."""
    value = _float(text, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a width, β, a learning rate)."""
    value = _float(text, "a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """A number in (0, 1] (a step size)."""
    value = _float(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def output_file(text: str) -> Path:
    """A file the command may write: its folder exists and is writable, and it is no folder."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file to write")
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} {why}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return path

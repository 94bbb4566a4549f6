"""The argument parser of the commands outside Lightning's CLI (gradcheck, bench, energy, parity,
reproduce, report, write-ffcv): a bad flag or value is one ``pcn_ep: error:`` line, exit 2, as
every other pcn_ep error (argparse would print the whole usage first). ``--help`` shows each flag's
default beside its description. ``import_object``: a ``module.Name`` as a config's ``class_path``
gives it."""
from __future__ import annotations

import argparse
import importlib
import sys


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends ``(default: VALUE)``, except where there is nothing to
    say (a switch that is off, a flag whose absence means "not set", a repeatable flag given no
    times) or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, [], argparse.SUPPRESS)
                or isinstance(action, argparse._StoreConstAction) or not action.option_strings):
            return text
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.removeprefix("python -m pcn_ep ")
        print(f"pcn_ep: error: {command}: {message} (python -m pcn_ep {command} --help lists the "
              "options)", file=sys.stderr)
        sys.exit(2)


def import_object(dotted: str):
    """``module.Name`` imported, as a config's ``class_path`` names a class (``fit``'s network and
    data checks, ``gradcheck``/``bench --network``)."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)

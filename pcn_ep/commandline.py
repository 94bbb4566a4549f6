"""The argument parser of the commands outside Lightning's CLI (gradcheck, bench, energy, parity,
reproduce, report, write-ffcv): a bad flag or value is one ``pcn_ep: error:`` line, exit 2, as
every other pcn_ep error (argparse would print the whole usage first)."""
from __future__ import annotations

import argparse
import sys


class CommandParser(argparse.ArgumentParser):
    def error(self, message: str):
        command = self.prog.removeprefix("python -m pcn_ep ")
        print(f"pcn_ep: error: {command}: {message} (python -m pcn_ep {command} --help lists the "
              "options)", file=sys.stderr)
        sys.exit(2)

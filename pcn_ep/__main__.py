"""``python -m pcn_ep COMMAND ...``: one entry point for every command (``--help`` lists them)."""
import importlib
import os
import sys
import traceback
from pathlib import Path

# command: (module, one line for --help); fit/validate/test go through LightningCLI
COMMANDS = {
    "fit": ("pcn_ep.training.cli", "train a PCN (EP or backprop); default: the embedded digits run"),
    "validate": ("pcn_ep.training.cli", "evaluate a checkpoint on the validation split"),
    "test": ("pcn_ep.training.cli", "evaluate a checkpoint on the test split"),
    "gradcheck": ("pcn_ep.tools.gradcheck", "per-layer fidelity of the EP gradient against backprop"),
    "bench": ("pcn_ep.tools.bench", "EP vs backprop: step time, FLOPs, GPU operations, memory per example"),
    "energy": ("pcn_ep.tools.energy", "total energy F vs nudge iteration K (the paper's Fig. 8)"),
    "parity": ("pcn_ep.experiments.parity", "the sparse-parity table (PCN-EP, Hopfield-EP, backprop)"),
    "reproduce": ("pcn_ep.experiments.reproduce", "run one paper table's grid of runs, then report it"),
    "report": ("pcn_ep.experiments.report", "Markdown tables and PNG figures from finished runs"),
    "write-ffcv": ("pcn_ep.data.write_ffcv", "convert an ImageFolder tree to an FFCV .beton file"),
}
LIGHTNING = ("fit", "validate", "test")


def usage() -> str:
    lines = ["usage: python -m pcn_ep COMMAND [options]   (python -m pcn_ep COMMAND --help for its options)",
             "", "commands:"]
    return "\n".join(lines + [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "fit"
    if command in ("-h", "--help"):
        print(usage())
        return 0
    if command not in COMMANDS:
        print(f"pcn_ep: error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    try:
        if command not in LIGHTNING:
            return importlib.import_module(COMMANDS[command][0]).main(argv[1:])
        from .training.cli import main as lightning_main

        return lightning_main(argv or ["fit"])
    except Exception as err:  # noqa: BLE001 - what no command foresaw: still one line
        if os.environ.get("PCN_EP_TRACEBACK"):
            raise
        text = " ".join(str(err).split()) or "(no message)"
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(f"pcn_ep: error: {command}: unexpected {type(err).__name__}: {text} (at "
              f"{Path(where.filename).name}:{where.lineno}; PCN_EP_TRACEBACK=1 shows the traceback, "
              "and it is worth an issue)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

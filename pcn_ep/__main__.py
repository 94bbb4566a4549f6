"""``python -m pcn_ep COMMAND ...``: one entry point for every command.

fit | validate | test   LightningCLI training and evaluation (``pcn_ep.training.cli``)
gradcheck               per-layer fidelity of EP against backprop (``pcn_ep.tools.gradcheck``)
parity                  the sparse-parity table (``pcn_ep.experiments.parity``)
bench                   EP vs backprop step time and FLOPs (``pcn_ep.tools.bench``)
write-ffcv              an ImageFolder tree to an FFCV .beton (``pcn_ep.data.write_ffcv``)
energy                  F vs nudge iteration K, Fig. 8 (``pcn_ep.tools.energy``)
reproduce               one paper table's grid of runs, then its report (``pcn_ep.experiments.reproduce``)
report                  Markdown tables and PNG figures from the runs (``pcn_ep.experiments.report``)
"""
import importlib
import sys

TOOLS = {"gradcheck": "pcn_ep.tools.gradcheck", "parity": "pcn_ep.experiments.parity", "bench": "pcn_ep.tools.bench",
         "write-ffcv": "pcn_ep.data.write_ffcv", "energy": "pcn_ep.tools.energy",
         "reproduce": "pcn_ep.experiments.reproduce", "report": "pcn_ep.experiments.report"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "fit"
    if command in TOOLS:
        return importlib.import_module(TOOLS[command]).main(argv[1:])
    from .training.cli import main as lightning_main

    return lightning_main(argv or ["fit"])


if __name__ == "__main__":
    sys.exit(main())

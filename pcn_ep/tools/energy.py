"""``python -m pcn_ep energy --config CFG [--ckpt FILE] --out FILE.json``: Fig. 8's equilibration curves.

The total energy F = E + βC of the nudged state after each of K = 0..K_max iterations, for mod-PGD and
PGD at +β and −β (the config's β, order and α), on the first ``--images`` validation images. The
paper uses a VGG10 and 8 ImageNet validation images; it does not say whether the network is trained
[?]: without ``--ckpt`` the curves are those of the network at initialization.

Output: ``{"K": [0..K_max], "beta": β, "curves": {"mod-pgd/+": {"mean": [...], "per_image": [[...]]},
...}, "delta_F": {"mod-pgd/+": F(K_config) − F(0), ...}}``. Exit 2 on a bad flag or value, 1 on a
checkpoint that is missing, unreadable, holds anything but data, or does not fit the config's network
(one line naming the file and the first tensor that differs).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..argtypes import output_file, positive_int, seed
from ..commandline import CommandParser
from ..core import Dynamics, get_cost, nudged_phase


def energy_curves(network, x, y, cost: str, beta: float, dynamics: Dynamics,
                  pool_routing: str = "free") -> dict:
    """Per-image F(K) for both rules at +β and −β: one free phase, then per rule one nudged phase
    with the two signs as two copies of the batch (as centered EP runs them: a batch-coupled layer
    such as BatchNorm takes each copy's own statistics), no weight gradients. ``pool_routing``:
    the training config's (see ``pcn_ep.core.equilibrium``)."""
    curves, n = {}, len(y)
    betas = torch.cat([torch.full((n,), b, dtype=torch.float64, device=x.device)
                       for b in (beta, -beta)])
    with torch.no_grad():
        free = network.free_phase(x)
        for rule in ("mod-pgd", "pgd"):
            nudged = nudged_phase(network, free, y, betas, get_cost(cost),
                                  Dynamics(dynamics.K, rule, dynamics.order, dynamics.alpha),
                                  trace=True, pool_routing=pool_routing)
            f = torch.stack([e + betas.to(e.dtype) * c for e, c in nudged.trace])  # (K+1) × 2n
            for sign, part in (("+", f[:, :n]), ("-", f[:, n:])):
                curves[f"{rule}/{sign}"] = {"mean": part.mean(1).tolist(),
                                            "per_image": part.T.tolist()}
    return curves


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pcn_ep energy",
                      description="the total energy F = E + βC of the nudged state after each "
                                  "nudged-phase iteration K (the paper's Fig. 8), as JSON")
    p.add_argument("--config", action="append", required=True,
                   help="a training config (repeatable, layered like fit's)")
    p.add_argument("--ckpt", default=None, help="weights to load (a fit checkpoint)")
    p.add_argument("--out", type=output_file, required=True,
                   help="the JSON file to write (its folder must exist)")
    p.add_argument("--images", type=positive_int, default=8,
                   help="validation images to trace (the first ones; the paper uses 8)")
    p.add_argument("--K-max", type=positive_int, default=20,
                   help="iterations to trace (the paper: K=10 in training, spike from K≈5)")
    p.add_argument("--device", default="cpu", help="a torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=seed, default=0,
                   help="seeds the network's initial weights (without --ckpt) and the data")
    return p


def read_checkpoint(path: str) -> dict:
    """The weights of a fit checkpoint, loaded as data only (``load_checkpoint``: a file that would
    run code is refused); every fault is a ``ValueError`` naming the file. ``reproduce
    --energy-ckpt`` checks its file with this before its first run."""
    from ..training.callbacks import load_checkpoint  # Lightning: only when asked

    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_checkpoint(path)["state_dict"]


def check_fits(state: dict, model: torch.nn.Module, path: str) -> None:
    """One line naming the file and the first tensor that does not fit the config's network."""
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise ValueError(f"checkpoint {path} does not fit the config's network: it holds {key}, "
                             "which the network lacks")
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"checkpoint {path} does not fit the config's network: {key} is "
                             f"{shape}, the network's is {tuple(expected[key].shape)}")
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the config's network: it lacks {missing[0]}"
                         + (f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ..training.cli import PCNCLI, check_config_files, quiet_known_noise

    quiet_known_noise()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    torch.manual_seed(args.seed)
    config_args = [a for c in args.config for a in ("--config", c)] + [f"--seed_everything={args.seed}"]
    try:
        torch.empty(0, device=args.device)  # an unknown or absent device: one line, before any work
    except (RuntimeError, AssertionError) as err:
        print(f"pcn_ep: error: energy: --device {args.device}: {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 2
    try:
        for logger in loggers:  # no trainer runs here: its notices (devices, seed) are noise
            logger.setLevel(logging.WARNING)
        state = read_checkpoint(args.ckpt) if args.ckpt else None
        check_config_files(config_args)
        cli = PCNCLI(config_args, run=False)
        model, data = cli.model, cli.datamodule
        if state is not None:
            check_fits(state, model, args.ckpt)
            model.load_state_dict(state)
        data.setup("validate")
        x, y = next(iter(data.val_dataloader()))
    except (ValueError, FileNotFoundError, argparse.ArgumentError) as err:
        print("pcn_ep: error: energy: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    x, y = data.on_after_batch_transfer((x[: args.images], y[: args.images]), 0)
    network = model.network.to(args.device)
    hp = model.hparams
    dynamics = Dynamics(args.K_max, hp.rule, hp.order, hp.alpha)
    curves = energy_curves(network, x.to(args.device), y.to(args.device), hp.cost, hp.beta, dynamics,
                           hp.get("pool_routing", "free"))
    result = {"K": list(range(args.K_max + 1)), "beta": hp.beta, "K_config": hp.K,
              "images": len(y), "checkpoint": args.ckpt, "curves": curves,
              "delta_F": {name: c["mean"][min(hp.K, args.K_max)] - c["mean"][0]
                          for name, c in curves.items()}}
    args.out.write_text(json.dumps(result, indent=1))
    for name, delta in result["delta_F"].items():
        print(f"{name:<10} F(0) {curves[name]['mean'][0]:.4g}  F(K={hp.K}) "
              f"{curves[name]['mean'][min(hp.K, args.K_max)]:.4g}  delta_F {delta:+.4g}")
    return 0

"""``python -m pcn_ep energy --config CFG [--ckpt FILE] --out FILE.json``: Fig. 8's equilibration curves.

The total energy F = E + βC of the nudged state after each of K = 0..K_max iterations, for mod-PGD and
PGD at +β and −β (the config's β, order and α), on the first ``--images`` validation images. The
paper uses a VGG10 and 8 ImageNet validation images; it does not say whether the network is trained
[?]: without ``--ckpt`` the curves are those of the network at initialization.

Output: ``{"K": [0..K_max], "beta": β, "curves": {"mod-pgd/+": {"mean": [...], "per_image": [[...]]},
...}, "delta_F": {"mod-pgd/+": F(K_config) − F(0), ...}}``. Exit 1 on a missing checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..commandline import CommandParser
from ..core import Dynamics, get_cost, nudged_phase


def energy_curves(network, x, y, cost: str, beta: float, dynamics: Dynamics,
                  pool_routing: str = "free") -> dict:
    """Per-image F(K) for both rules at +β and −β: one free phase, then per rule one batched nudged
    phase over [x; x] with β_i = [+β; −β] (as the centered estimator runs it), no weight gradients.
    ``pool_routing``: the training config's (see ``pcn_ep.core.equilibrium``)."""
    n, curves = len(y), {}
    betas = torch.cat([torch.full((n,), beta), torch.full((n,), -beta)]).to(x.device, torch.float64)
    with torch.no_grad():
        free = network.free_phase(x).repeat(2)
        for rule in ("mod-pgd", "pgd"):
            nudged = nudged_phase(network, free, y.repeat(2), betas, get_cost(cost),
                                  Dynamics(dynamics.K, rule, dynamics.order, dynamics.alpha),
                                  trace=True, pool_routing=pool_routing)
            f = torch.stack([e + betas.to(e.dtype) * c for e, c in nudged.trace])  # (K+1) × 2n
            for sign, half in (("+", f[:, :n]), ("-", f[:, n:])):
                curves[f"{rule}/{sign}"] = {"mean": half.mean(1).tolist(),
                                            "per_image": half.T.tolist()}
    return curves


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pcn_ep energy", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", required=True,
                   help="a training config (repeatable, layered like fit's)")
    p.add_argument("--ckpt", default=None, help="weights to load (a fit checkpoint)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--K-max", type=int, default=20, help="iterations to trace (the paper: K=10 in "
                                                         "training, spike from K≈5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import warnings

    from ..training.cli import PCNCLI

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    torch.manual_seed(args.seed)
    config_args = [a for c in args.config for a in ("--config", c)] + [f"--seed_everything={args.seed}"]
    try:
        cli = PCNCLI(config_args, run=False)
        model, data = cli.model, cli.datamodule
        if args.ckpt:
            if not Path(args.ckpt).is_file():
                raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
            model.load_state_dict(torch.load(args.ckpt, map_location="cpu",
                                             weights_only=False)["state_dict"])
        data.setup("validate")
        x, y = next(iter(data.val_dataloader()))
    except (ValueError, FileNotFoundError) as err:
        print(f"pcn_ep: error: {err}", file=sys.stderr)
        return 1
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, delta in result["delta_F"].items():
        print(f"{name:<10} F(0) {curves[name]['mean'][0]:.4g}  F(K={hp.K}) "
              f"{curves[name]['mean'][min(hp.K, args.K_max)]:.4g}  delta_F {delta:+.4g}")
    return 0

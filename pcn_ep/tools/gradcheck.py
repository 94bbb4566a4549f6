"""``python -m pcn_ep gradcheck``: how close is the EP gradient to backprop's, layer by layer?

Builds a network, draws a random batch, and compares, for every parameter tensor, the EP estimate
with autograd backprop of the same cost on the same network: cosine similarity and relative error
‖g_EP − g_BP‖ / ‖g_BP‖. ``gradient_fidelity`` is the reusable part (the training callback uses it).

Exit status: 0 when measured, 1 when the relaxation diverged (reported, not raised), 2 on bad flags.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import (NETWORKS, ORDERS, PCN, PERTURBATIONS, RULES, SCHEMES, Backprop,
                   DivergenceError, Dynamics, EquilibriumPropagation)


def gradient_fidelity(
    network: PCN, ep: EquilibriumPropagation, x: Tensor, y: Tensor
) -> dict:
    """Per-parameter cosine and relative error of EP against backprop, plus divergence and kinks.

    ``diverged`` is true when a state or gradient is non-finite, or when the nudged state's
    prediction-error energy E exceeds the free state's cost C: the perturbation is then no longer
    small, whatever β is, and the relaxation has blown up (synchronous α = 1 does this).
    """
    params = list(network.parameters())
    bp = Backprop(ep.cost.name)(network, x, y)
    g_bp = torch.autograd.grad(bp.surrogate, params)
    report = {"diverged": False, "layers": [], "min_cosine": None, "max_rel_err": None}
    ep.count_kinks = True
    try:
        estimate = ep(network, x, y)
    except DivergenceError as err:
        return {**report, "diverged": True, "reason": str(err)}
    energies = [estimate.stats[k] for k in ("E+", "E-") if k in estimate.stats]
    if any(e > bp.loss for e in energies):
        report["diverged"] = True
        report["reason"] = (f"nudged prediction-error energy {max(energies).item():.3g} exceeds the "
                            f"free cost {bp.loss.item():.3g}: the relaxation blew up")
    g_ep = torch.autograd.grad(estimate.surrogate, params)
    for (name, _), a, b in zip(network.named_parameters(), g_ep, g_bp):
        cosine = F.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-300).item()
        rel = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
        report["layers"].append({"name": name, "cosine": cosine, "rel_err": rel})
    report["min_cosine"] = min(r["cosine"] for r in report["layers"])
    report["max_rel_err"] = max(r["rel_err"] for r in report["layers"])
    report["kink_crossings"] = sum(estimate.kinks)
    return report


def build_network(args: argparse.Namespace) -> PCN:
    if args.model == "mlp":
        width = max(1, round(256 * args.width_mult))
        return NETWORKS["mlp"](args.in_channels * args.input_size**2, args.num_classes,
                               hidden=(width, width))
    return NETWORKS[args.model](in_channels=args.in_channels, num_classes=args.num_classes,
                                input_size=args.input_size, width_mult=args.width_mult)


def add_network_arguments(p: argparse.ArgumentParser, width_mult: float) -> None:
    """The flags that pick a network (shared by ``gradcheck`` and ``bench``)."""
    p.add_argument("--model", choices=sorted(NETWORKS), default="vgg5")
    p.add_argument("--width-mult", type=float, default=width_mult)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcn_ep gradcheck", description=__doc__.split("\n")[0])
    add_network_arguments(p, width_mult=0.125)
    p.add_argument("--cost", choices=["ce", "mse"], default="ce")
    p.add_argument("--perturbation", choices=PERTURBATIONS, default="nudge")
    p.add_argument("--scheme", choices=SCHEMES, default="centered")
    p.add_argument("--beta", type=float, default=1e-3)
    p.add_argument("--K", type=int, default=None, help="nudge iterations (default: number of layers)")
    p.add_argument("--rule", choices=RULES, default="mod-pgd")
    p.add_argument("--order", choices=ORDERS, default="async")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        network = build_network(args).to(getattr(torch, args.dtype))
        K = args.K if args.K is not None else network.depth
        ep = EquilibriumPropagation(args.cost, args.perturbation, args.scheme, args.beta,
                                    Dynamics(K, args.rule, args.order, args.alpha))
    except ValueError as err:
        print(f"gradcheck: error: {err}", file=sys.stderr)
        return 2
    shape = (args.batch_size, args.in_channels, args.input_size, args.input_size)
    x = torch.randn(shape, dtype=getattr(torch, args.dtype))
    if args.model == "mlp":
        x = x.flatten(1)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    report = gradient_fidelity(network, ep, x, y)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{type(network).__name__}, {args.scheme} {args.perturbation} ({args.cost}), "
              f"beta={args.beta}, K={K}, {args.rule}, {args.order}, alpha={args.alpha}, {args.dtype}")
        if report["diverged"]:
            print(f"DIVERGED: {report['reason']}")
        for r in report["layers"]:
            print(f"  {r['name']:<24} cosine {r['cosine']: .8f}   rel_err {r['rel_err']:.3e}")
        if report["layers"]:
            print(f"min cosine {report['min_cosine']:.8f}   max rel_err {report['max_rel_err']:.3e}"
                  f"   kink crossings {report['kink_crossings']}")
    return 1 if report["diverged"] else 0

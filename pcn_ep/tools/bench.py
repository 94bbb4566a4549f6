"""``python -m pcn_ep bench``: EP and backprop training steps of one network, side by side.

Times full training steps (estimate, backward of the surrogate, SGD step) for EP and for BP in the
same process, median over ``--steps`` after two warm-up steps, and counts the FLOPs of one step of
each with ``torch.utils.flop_counter.FlopCounterMode``. Prints one JSON object (``--json``) or a
table. ``mfu`` (model FLOPs utilization) is reported on known GPUs only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..core import ORDERS, RULES, SCHEMES, Backprop, Dynamics, EquilibriumPropagation
from ..training.fastfit import training_step
from .gradcheck import add_network_arguments, build_network

# Dense peak throughput per GPU, FLOP/s (vendor datasheets; SXM parts; fp32 = non-tensor-core).
PEAK_FLOPS = {"H100": {"bf16": 989e12, "32": 67e12}, "H200": {"bf16": 989e12, "32": 67e12},
              "A100": {"bf16": 312e12, "32": 19.5e12}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcn_ep bench", description=__doc__.split("\n")[0])
    add_network_arguments(p, width_mult=0.25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scheme", choices=SCHEMES, default="centered")
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--rule", choices=RULES, default="mod-pgd")
    p.add_argument("--order", choices=ORDERS, default="async")
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each training step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p


def step_flops(network, estimator, x, y) -> int:
    """FLOPs of one estimate + backward (eager), as counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        estimator(network, x, y).surrogate.backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(step, network, estimator, optimizer, x, y, args) -> tuple[float, int]:
    """(median seconds per step, FLOPs of one step)."""
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def once():
        with autocast:
            step(network, estimator, optimizer, x, y)

    with autocast:
        flops = step_flops(network, estimator, x, y)
    for _ in range(2):
        once()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), flops


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    network = build_network(args).to(device)
    x = torch.randn(args.batch_size, args.in_channels, args.input_size, args.input_size,
                    device=device)
    if args.model == "mlp":
        x = x.flatten(1)
    elif args.channels_last:
        network = network.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
    step = torch.compile(training_step) if args.compile else training_step
    ep = EquilibriumPropagation("ce", "nudge", args.scheme, args.beta,
                                Dynamics(args.K, args.rule, args.order))
    ep_s, ep_flops = measure(step, network, ep, optimizer, x, y, args)
    bp_s, bp_flops = measure(step, network, Backprop("ce"), optimizer, x, y, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v[args.precision] for k, v in PEAK_FLOPS.items() if k in name), None)
    return {
        "ep_step_s": ep_s, "bp_step_s": bp_s, "time_ratio": ep_s / bp_s,
        "ep_flops": ep_flops, "bp_flops": bp_flops, "flop_ratio": ep_flops / bp_flops,
        "images_per_s": args.batch_size / ep_s,
        "mfu": ep_flops / ep_s / peak if peak else None,
        "device": name,
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except ValueError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>14}: {value:.4g}" if isinstance(value, float) else f"{key:>14}: {value}")
    return 0

"""``python -m pcn_ep bench``: EP and backprop training steps of one network, side by side.

Times full training steps (estimate, backward of the surrogate, SGD step) for EP and for BP in the
same process, median over ``--steps`` after two warm-up steps, and counts the FLOPs
(``FlopCounterMode``) and the kernels (non-view ATen ops) of one eager step of each. Prints one
JSON object (``--json``) or a table. ``mfu`` (model FLOPs utilization) is reported on known GPUs.

``--memory`` measures instead the peak memory per example of one training step, for BP and for
centered and random EP: the slope of the peak between two batch sizes (``--batch-sizes``), so
weights, optimizer state and the interpreter cancel out; on CPU the peak resident set of a fresh
process per run (glibc set to mmap every block above 64 KiB, so that it follows the live
tensors), on CUDA the allocator's peak. It also projects the peak at ``--at`` examples.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..argtypes import output_file, positive_float, positive_int, seed
from ..commandline import CommandParser
from ..core import (ORDERS, POOL_ROUTINGS, RULES, SCHEMES, Backprop, Dynamics,
                    EquilibriumPropagation, as_generic, compile_estimator)
from ..training.fastfit import training_step
from .gradcheck import add_network_arguments, build_network

# Dense peak throughput per GPU, FLOP/s (vendor datasheets; SXM parts; fp32 = non-tensor-core).
PEAK_FLOPS = {"H100": {"bf16": 989e12, "32": 67e12}, "H200": {"bf16": 989e12, "32": 67e12},
              "A100": {"bf16": 312e12, "32": 19.5e12}}


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pcn_ep bench", description=__doc__.split("\n")[0])
    add_network_arguments(p, width_mult=0.25)
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per training step")
    p.add_argument("--scheme", choices=SCHEMES, default="centered",
                   help="EP's scheme: +β (forward), -β (backward), a random sign per example, or "
                        "+β and -β (centered: twice the nudged-phase work)")
    p.add_argument("--beta", type=positive_float, default=0.05, help="the nudge strength |β|")
    p.add_argument("--K", type=positive_int, default=5,
                   help="nudged-phase iterations, each a sweep over the layers")
    p.add_argument("--rule", choices=RULES, default="mod-pgd",
                   help="the state update: mod-pgd (the paper's Eq. 20) or pgd (Eq. 19)")
    p.add_argument("--order", choices=ORDERS, default="async",
                   help="layer order within an iteration: async (even then odd layers) or sync")
    p.add_argument("--pool-routing", choices=POOL_ROUTINGS, default="free",
                   help="max-pool winners in the nudged phase: the free phase's, or recomputed")
    p.add_argument("--precision", choices=["32", "bf16"], default="32",
                   help="float32, or bfloat16 mixed precision (autocast; GPU)")
    p.add_argument("--channels-last", action="store_true",
                   help="store images and activations channels-last (NHWC), often faster on GPUs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each estimate whole (core.compile_estimator)")
    p.add_argument("--generic", action="store_true",
                   help="also time EP on the same network rebuilt from plain torch modules "
                        "(GenericLayer: vector-Jacobian products instead of the closed-form maps), "
                        "with the same weights and batch")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed training steps per method, after two warm-up steps (the median "
                        "is reported)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--seed", type=seed, default=0, help="seeds the weights and the random batch")
    p.add_argument("--memory", action="store_true",
                   help="peak memory per example of BP, centered and random EP instead of time")
    p.add_argument("--batch-sizes", type=positive_int, nargs=2, default=[8, 16], metavar=("B1", "B2"),
                   help="two different batch sizes for --memory (default: 8 16)")
    p.add_argument("--at", type=positive_int, default=256,
                   help="with --memory: the batch size at which the peak memory is projected")
    p.add_argument("--suite", choices=["gpu"], default=None,
                   help="the GPU suite: VGG10 at 224 px in float32, bfloat16 and compiled, "
                        "memory, EP-backprop cosines, multi-GPU (DDP)")
    p.add_argument("--out", type=output_file, default=None,
                   help="where --suite writes its table (default: BENCHMARKS-gpu.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def step_flops(network, estimator, x, y) -> int:
    """FLOPs of one estimate + backward (eager), as counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        estimator(network, x, y).surrogate.backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class _KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def step_kernels(network, estimator, x, y) -> int:
    """Kernels (ATen ops that are not views) of one estimate + backward (eager)."""
    with _KernelCounter() as counter:
        estimator(network, x, y).surrogate.backward()
    network.zero_grad(set_to_none=True)
    return counter.count


def _autocast(args: argparse.Namespace):
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def measure(network, estimator, optimizer, x, y, args) -> tuple[float, int, int]:
    """(median seconds per step, FLOPs and kernels of one eager step)."""
    with _autocast(args):
        flops = step_flops(network, estimator, x, y)
        kernels = step_kernels(network, estimator, x, y)
    call = compile_estimator(estimator) if args.compile else estimator

    def once():
        with _autocast(args):
            training_step(network, call, optimizer, x, y)

    for _ in range(2):
        once()
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        start = time.perf_counter()
        once()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), flops, kernels


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def setup(args: argparse.Namespace, batch: int):
    """Network, optimizer and one random batch, as every measurement uses them."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    network = build_network(args).to(device)
    x = torch.randn(batch, args.in_channels, args.input_size, args.input_size, device=device)
    if args.model == "mlp":
        x = x.flatten(1)
    elif args.channels_last:
        network = network.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
    return network, optimizer, x, y


def estimator(args: argparse.Namespace, method: str):
    """``bp``, or EP with the scheme ``method`` (never syncing: as a compiled step runs it)."""
    if method == "bp":
        return Backprop("ce", check_finite=False)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    return EquilibriumPropagation("ce", "nudge", method, args.beta,
                                  Dynamics(args.K, args.rule, args.order), generator=generator,
                                  check_finite=False, pool_routing=args.pool_routing)


def run(args: argparse.Namespace) -> dict:
    network, optimizer, x, y = setup(args, args.batch_size)
    ep_s, ep_flops, ep_kernels = measure(network, estimator(args, args.scheme), optimizer, x, y,
                                         args)
    bp_s, bp_flops, bp_kernels = measure(network, estimator(args, "bp"), optimizer, x, y, args)
    name = torch.cuda.get_device_name(args.device) if args.device == "cuda" else "cpu"
    peak = next((v[args.precision] for k, v in PEAK_FLOPS.items() if k in name), None)
    generic = {}
    if args.generic:
        twin = as_generic(network)
        twin_optimizer = torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.9)
        generic_s = measure(twin, estimator(args, args.scheme), twin_optimizer, x, y, args)[0]
        generic = {"ep_generic_step_s": generic_s, "generic_ratio": generic_s / ep_s}
    return {**generic,
        "ep_step_s": ep_s, "bp_step_s": bp_s, "time_ratio": ep_s / bp_s,
        "ep_flops": ep_flops, "bp_flops": bp_flops, "flop_ratio": ep_flops / bp_flops,
        "ep_kernels": ep_kernels, "bp_kernels": bp_kernels,
        "images_per_s": args.batch_size / ep_s,
        "mfu": ep_flops / ep_s / peak if peak else None,
        "device": name,
    }


# -- memory -------------------------------------------------------------------------------------
def peak_bytes(args: argparse.Namespace, method: str, batch: int) -> int:
    """Peak memory of one training step of ``method`` at ``batch`` examples."""
    if args.device == "cuda":
        network, optimizer, x, y = setup(args, batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with _autocast(args):
            training_step(network, estimator(args, method), optimizer, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    spec = json.dumps({"args": vars(args), "method": method, "batch": batch}, default=str)
    code = "import sys; from pcn_ep.tools.bench import _child_peak; print(_child_peak(sys.argv[1]))"
    # glibc serves every block above 64 KiB with its own mmap: the resident set then follows the
    # live tensors, not the reuse pattern of the heap (which made the slope vary by ±15 MiB).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise RuntimeError(f"memory run failed ({method}, batch {batch}): {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def _child_peak(spec: str) -> int:
    """In a fresh process: one training step, then the peak resident set in bytes (Linux)."""
    spec = json.loads(spec)
    args = argparse.Namespace(**spec["args"])
    network, optimizer, x, y = setup(args, spec["batch"])
    with _autocast(args):
        training_step(network, estimator(args, spec["method"]), optimizer, x, y)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(args: argparse.Namespace) -> dict:
    """Per method: peak bytes at both batch sizes, bytes per example and the projected peak."""
    b1, b2 = args.batch_sizes
    report = {"device": args.device, "batch_sizes": [b1, b2], "at": args.at}
    for method in ("bp", "centered", "random"):
        p1, p2 = peak_bytes(args, method, b1), peak_bytes(args, method, b2)
        per_example = (p2 - p1) / (b2 - b1)
        report[method] = {"peak_bytes": [p1, p2], "bytes_per_example": per_example,
                          "projected_peak_bytes": p1 + per_example * (args.at - b1)}
    return report


# -- the GPU suite ------------------------------------------------------------------------------
def precision_cosines(network, x, y, ep: EquilibriumPropagation) -> dict[str, list[float]]:
    """Per-parameter cosine to float64 backprop of: EP in float64, float32 and bf16 autocast, and
    backprop in bf16 autocast (the bar EP's bf16 is held to)."""
    import copy

    def grads(net, est, inputs, bf16=False):
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            surrogate = est(net, inputs, y).surrogate
        return [g.double() for g in torch.autograd.grad(surrogate, list(net.parameters()))]

    def cos(a, b):
        return [torch.nn.functional.cosine_similarity(u.flatten(), v.flatten(), dim=0).item()
                for u, v in zip(a, b)]

    net64 = copy.deepcopy(network).double()
    reference = grads(net64, Backprop(), x.double())
    return {"ep_float64": cos(grads(net64, ep, x.double()), reference),
            "ep_float32": cos(grads(network, ep, x), reference),
            "ep_bf16": cos(grads(network, ep, x, True), reference),
            "bp_bf16": cos(grads(network, Backprop(), x, True), reference)}


def _ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    """Two EP training steps under DDP (NCCL); rank 0 reports whether the ranks agree."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    args = argparse.Namespace(**{**vars(args), "seed": 0})
    network, _, x, y = setup(args, args.batch_size)
    ddp = torch.nn.parallel.DistributedDataParallel(network, device_ids=[rank])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
    ep = estimator(args, "centered")
    start = time.perf_counter()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(args):
            ep(ddp.module, x + rank, y).surrogate.backward()  # DDP hooks all-reduce the grads
        optimizer.step()
    torch.cuda.synchronize()
    checksum = torch.stack([p.double().sum() for p in network.parameters()]).sum().view(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        out.put({"gpus": world, "seconds": time.perf_counter() - start,
                 "ranks_agree": all(torch.equal(s, sums[0]) for s in sums)})
    dist.destroy_process_group()


def ddp_check(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    world = torch.cuda.device_count()
    mp.start_processes(_ddp_worker, (world, 29533, args, queue), nprocs=world,
                       start_method="spawn")
    return queue.get()


def gpu_suite(args: argparse.Namespace) -> str:
    """The GPU table (Markdown): VGG10 at 224, batch ``--batch-size``, K ``--K``."""
    base = {**vars(args), "model": "vgg10", "width_mult": 1.0, "input_size": 224,
            "num_classes": 1000, "in_channels": 3, "device": "cuda", "steps": 5}
    name = torch.cuda.get_device_name()
    lines = [f"GPU suite on {name}, torch {torch.__version__}: VGG10 224×224, batch "
             f"{args.batch_size}, β {args.beta}, K {args.K}, {args.rule}, {args.order}, "
             f"pool routing {args.pool_routing}", "",
             "| precision | compiled | method | images/s | EP/BP wall | EP/BP FLOPs | MFU | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for precision, compiled in (("32", False), ("bf16", False), ("32", True), ("bf16", True)):
        run_args = argparse.Namespace(**{**base, "precision": precision, "compile": compiled})
        network, optimizer, x, y = setup(run_args, args.batch_size)
        peak = next((v[precision] for k, v in PEAK_FLOPS.items() if k in name), None)
        results = {m: measure(network, estimator(run_args, m), optimizer, x, y, run_args)
                   for m in ("bp", "centered", "random")}
        bp_s, bp_flops, _ = results["bp"]
        for method, (seconds, flops, kernels) in results.items():
            mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
            ratios = ("—", "—") if method == "bp" else (f"{seconds / bp_s:.2f}",
                                                        f"{flops / bp_flops:.2f}")
            lines.append(f"| {precision} | {compiled} | {method} | {args.batch_size / seconds:.1f} "
                         f"| {ratios[0]} | {ratios[1]} | {mfu} | {kernels} |")
    lines += ["", "| method | bytes/example | peak at batch |", "|---|---|---|"]
    for method in ("bp", "centered", "random"):
        mem_args = argparse.Namespace(**{**base, "precision": "32"})
        at = args.at
        while at >= 8:
            try:
                peak_at = peak_bytes(mem_args, method, at)
                per_example = (peak_at - peak_bytes(mem_args, method, at // 2)) / (at - at // 2)
                lines.append(f"| {method} | {per_example / 2**20:.1f} MiB | "
                             f"{peak_at / 2**30:.2f} GiB at {at} |")
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                at //= 2
    torch.manual_seed(0)
    from ..core import VGG10

    network = VGG10(3, 1000, input_size=64).cuda()
    x, y = torch.randn(8, 3, 64, 64, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    ep = EquilibriumPropagation("ce", "nudge", "centered", 0.05, Dynamics(10))
    cosines = precision_cosines(network, x, y, ep)
    names = [n for n, _ in network.named_parameters()]
    lines += ["", "Cosine to float64 backprop, VGG10 64×64, batch 8, β 0.05, K 10, centered:", "",
              "| parameter | " + " | ".join(cosines) + " |", "|---" * (len(cosines) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{c[i]:.5f}" for c in cosines.values()) + " |"
              for i, n in enumerate(names)]
    ddp = ddp_check(argparse.Namespace(**{**base, "precision": "bf16", "batch_size": 32}))
    lines += ["", f"DDP: 2 centered-EP steps (bf16, batch 32 per GPU) on {ddp['gpus']} GPU(s) in "
                  f"{ddp['seconds']:.1f} s; weights identical on every rank: {ddp['ranks_agree']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_sizes[0] == args.batch_sizes[1]:
        p.error(f"argument --batch-sizes: must be two different sizes, got {args.batch_sizes}")
    if args.suite == "gpu":
        if not torch.cuda.is_available():
            print("pcn_ep: error: --suite gpu needs a CUDA device; none is visible", file=sys.stderr)
            return 2
        if args.out is None:  # checked here, not as a default: only --suite writes it
            try:
                args.out = output_file("BENCHMARKS-gpu.md")
            except argparse.ArgumentTypeError as err:
                p.error(f"argument --out: {err}")
        table = gpu_suite(args)
        with open(args.out, "w") as f:
            f.write(table + "\n")
        print(table)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pcn_ep: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        report = memory(args) if args.memory else run(args)
    except ValueError as err:
        print(f"pcn_ep: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    elif args.memory:
        b1, b2 = args.batch_sizes
        print(configuration(args, report["device"], f"{b1} and {b2}").replace(
            f"; {args.scheme} EP", "; BP, centered and random EP"))
        print(f"peak memory of one training step per example: the slope between batch {b1} and {b2} "
              f"({'resident set' if args.device == 'cpu' else 'CUDA allocator'})")
        for method in ("bp", "centered", "random"):
            r = report[method]
            print(f"  {method:>8}: {r['bytes_per_example'] / 2**20:8.1f} MiB per example, "
                  f"projected {r['projected_peak_bytes'] / 2**30:7.2f} GiB at batch {args.at}")
    else:
        print(timing_table(args, report))
    return 0


def configuration(args: argparse.Namespace, device: str, batch: str | None = None) -> str:
    """What was measured, in one line: network, input, batch, EP settings, device, precision."""
    shape = (f"{args.in_channels}×{args.input_size}×{args.input_size}" if args.model != "mlp"
             else f"{args.in_channels * args.input_size ** 2} features")
    extras = [name for name, on in (("compiled", args.compile), ("channels-last", args.channels_last))
              if on]
    norm = f", {args.norm} norm" if args.model == "resnet18" else ""
    name = (f"{args.network} ({args.num_classes} classes)" if args.network else
            f"{args.model.upper()} (width ×{args.width_mult:g}{norm}, {args.num_classes} classes)")
    return (f"{name}, input {shape}, batch {batch or args.batch_size}; {args.scheme} EP, β {args.beta:g}, K {args.K}, "
            f"{args.rule}, {args.order}, pool routing {args.pool_routing}; {device}, "
            f"precision {args.precision}"
            + "".join(f", {e}" for e in extras))


def timing_table(args: argparse.Namespace, report: dict) -> str:
    """The timing report in human units (ms, GFLOP), EP beside BP."""
    rows = [("", "EP", "BP", "EP/BP"),
            ("step time", f"{report['ep_step_s'] * 1e3:.2f} ms", f"{report['bp_step_s'] * 1e3:.2f} ms",
             f"{report['time_ratio']:.2f}×"),
            ("FLOPs", f"{report['ep_flops'] / 1e9:.3f} GFLOP", f"{report['bp_flops'] / 1e9:.3f} GFLOP",
             f"{report['flop_ratio']:.2f}×"),
            ("kernels", str(report["ep_kernels"]), str(report["bp_kernels"]),
             f"{report['ep_kernels'] / report['bp_kernels']:.2f}×")]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [configuration(args, report["device"]),
             f"median of {args.steps} training steps after 2 warm-up steps:"]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"  EP throughput {report['images_per_s']:.1f} images/s"
                 + (f", MFU {report['mfu']:.1%}" if report["mfu"] is not None else ""))
    if "generic_ratio" in report:
        lines.append(f"  EP with generic layers (the same network from plain modules, VJPs): "
                     f"{report['ep_generic_step_s'] * 1e3:.2f} ms, {report['generic_ratio']:.2f}× "
                     "the closed form's step")
    return "\n".join(lines)

"""``python -m pcn_ep gradcheck``: how close is the EP gradient to backprop's, layer by layer?

Builds a network, takes a batch (random normal inputs, or real images with their flat regions),
and compares, for every parameter tensor, the EP estimate with autograd backprop of the same cost on
the same network: cosine similarity and relative error ‖g_EP − g_BP‖ / ‖g_BP‖. It also counts the
units that crossed a ReLU or max-pool kink during the relaxation (a finite-β effect) and, apart, the
max-pool windows whose maximum is tied in the free state (where the two pool routings differ at any
β). The comparison itself is ``pcn_ep.core.gradient_fidelity``, which the training callback
``GradientFidelity`` logs during a run.

Exit status: 0 when every tensor meets the thresholds, 1 when one does not or the relaxation
diverged, 2 on bad flags.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import Tensor

from ..argtypes import classes, nonneg_float, positive_float, positive_int, real, seed, unit_float
from ..commandline import CommandParser, import_object
from ..core import (NETWORKS, NORMS, ORDERS, PCN, PERTURBATIONS, POOL_ROUTINGS, RULES, SCHEMES,
                    Dynamics, EquilibriumPropagation, gradient_fidelity)

# What float64 centered EP meets on the default network (VGG5 at 1/8 width, 32×32, batch 4, β 1e-3,
# K = L, mod-PGD, async, random inputs), worst tensor of the worst seed: free routing, seeds 0-99,
# CE: cosine 0.99957, rel_err 0.029; MSE, seeds 0-29: 0.99947, 0.044 (nudged routing, CE, seeds 0-99:
# 0.99917, 0.041). The worst draws are those where a unit crosses a ReLU kink; the others reach ~1e-7.
MIN_COSINE = 0.999
MAX_REL_ERR = 0.05
IMAGE_SETS = ("mnist", "cifar10", "cifar100", "imagenet32")  # ImageDataModule's (imported lazily)


def build_network(args: argparse.Namespace) -> PCN:
    if args.network:
        return own_network(args.network, args.init_args)
    if args.model == "mlp":
        width = max(1, round(256 * args.width_mult))
        return NETWORKS["mlp"](args.in_channels * args.input_size**2, args.num_classes,
                               hidden=(width, width))
    extra = {"norm": args.norm} if args.model == "resnet18" else {}
    return NETWORKS[args.model](in_channels=args.in_channels, num_classes=args.num_classes,
                                input_size=args.input_size, width_mult=args.width_mult, **extra)


def own_network(class_path: str, init_args: str) -> PCN:
    """``module.Class(**init_args)``: a network of the user's (``GenericLayer``s from plain modules,
    say), imported as ``fit`` imports a config's ``class_path``; it must be a ``PCN``."""
    try:
        cls = import_object(class_path) if "." in class_path else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--network {class_path}: cannot import it ({err}; is its folder on "
                         "PYTHONPATH?)") from None
    if not (isinstance(cls, type) and issubclass(cls, PCN)):
        raise ValueError(f"--network {class_path}: not a pcn_ep.core.PCN subclass "
                         "(module.Class, e.g. my_pcn.TinyPCN)")
    try:
        kwargs = json.loads(init_args)
    except json.JSONDecodeError as err:
        raise ValueError(f"--init-args is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--init-args must be a JSON object of keyword arguments")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"--network {class_path}: {err}") from None


def add_network_arguments(p: argparse.ArgumentParser, width_mult: float) -> None:
    """The flags that pick a network (shared by ``gradcheck`` and ``bench``)."""
    p.add_argument("--model", choices=sorted(NETWORKS), default="vgg5",
                   help="the network: vgg5, vgg10 and vgg10skip as in the paper's Tables 5-6 and "
                        "Sec. 5.5, resnet18 (ResNet-18's layout of generic layers, a state per "
                        "block), or an MLP with two hidden layers of 256 x --width-mult units")
    p.add_argument("--network", metavar="MODULE.CLASS", default=None,
                   help="your own network instead of --model: a pcn_ep.core.PCN subclass, imported "
                        "as fit imports a class_path (its folder on PYTHONPATH); --in-channels, "
                        "--input-size and --num-classes must match it")
    p.add_argument("--init-args", metavar="JSON", default="{}",
                   help="keyword arguments of --network's class, as a JSON object")
    p.add_argument("--width-mult", type=positive_float, default=width_mult,
                   help="channel (or unit) count relative to the paper's network")
    p.add_argument("--input-size", type=positive_int, default=32,
                   help="height and width of the input images, in pixels")
    p.add_argument("--in-channels", type=positive_int, default=3,
                   help="input channels (3 for colour images, 1 for grey)")
    p.add_argument("--num-classes", type=classes, default=10, help="output classes")
    p.add_argument("--norm", choices=NORMS, default="batch",
                   help="resnet18 only: the normalization after each conv (batch: BatchNorm with "
                        "each nudged copy's batch statistics; group, layer or none) "
                        "(default: %(default)s)")


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pcn_ep gradcheck", description=__doc__.split("\n")[0],
                                epilog="Exit status: 0 pass, 1 below a threshold or diverged, 2 bad "
                                       "flags.")
    add_network_arguments(p, width_mult=0.125)
    p.add_argument("--cost", choices=["ce", "mse"], default="ce",
                   help="the output cost: cross-entropy or mean squared error")
    p.add_argument("--perturbation", choices=PERTURBATIONS, default="nudge",
                   help="how β acts on the output: nudge (β x cost added to the energy) or clamp "
                        "(the output pulled towards the target; the paper's Eq. 8)")
    p.add_argument("--scheme", choices=SCHEMES, default="centered",
                   help="which nudged states EP contrasts: +β (forward), -β (backward), a random "
                        "sign per example, or +β and -β (centered; the paper's Sec. 3.1)")
    p.add_argument("--beta", type=positive_float, default=1e-3,
                   help="the nudge strength |β|; the smaller, the closer EP is to backprop, down to "
                        "the float precision")
    p.add_argument("--K", type=positive_int, default=None,
                   help="nudged-phase iterations, each a sweep over the layers (default: the "
                        "number of layers, the paper's rule of thumb, Sec. 5.2)")
    p.add_argument("--rule", choices=RULES, default="mod-pgd",
                   help="the state update: mod-pgd (the paper's Eq. 20) or pgd (Eq. 19)")
    p.add_argument("--order", choices=ORDERS, default="async",
                   help="layer order within an iteration: async (even then odd layers, the paper's "
                        "App. A.1) or sync (all layers at once)")
    p.add_argument("--alpha", type=unit_float, default=1.0,
                   help="step size of the state update; 1 is the paper's closed form (Eq. 17)")
    p.add_argument("--pool-routing", choices=POOL_ROUTINGS, default="free",
                   help="max-pool routing in the nudged phase: free (the free phase's winners "
                        "kept, as backprop) or nudged (each window's max recomputed); they differ "
                        "where a window's max is tied (default: %(default)s)")
    p.add_argument("--data", choices=["random", "digits", *IMAGE_SETS],
                   default="random",
                   help="random: standard normal inputs; digits: scikit-learn's digits upsampled "
                        "to --input-size; mnist, cifar10, ...: training images from --data-root, "
                        "normalized as in training. Real images have flat regions that tie max-pool "
                        "windows; their channels, size and classes set the network's "
                        "(default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="the data set's folder, as data.init_args.root in training")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="floating-point precision of the network, the data and both gradients")
    p.add_argument("--batch-size", type=positive_int, default=4, help="examples in the batch")
    p.add_argument("--seed", type=seed, default=0,
                   help="seeds the weights, the random inputs and the random scheme's signs")
    p.add_argument("--min-cosine", type=real, default=MIN_COSINE,
                   help="fail (exit 1) if a tensor's cosine is below this; the default is met by "
                        "float64 centered EP on the default network (default: %(default)s)")
    p.add_argument("--max-rel-err", type=nonneg_float, default=MAX_REL_ERR,
                   help="fail (exit 1) if a tensor's relative error is above this; the default is "
                        "met by float64 centered EP on the default network (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def load_data(args: argparse.Namespace) -> tuple[Tensor, Tensor] | None:
    """A real data set's training images, normalized (None for random inputs); the network's
    channels, input size and classes follow them."""
    if args.data == "random":
        return None
    from ..data import DigitsDataModule, ImageDataModule  # Lightning: only when asked
    from ..data.images import normalize

    if args.data == "digits":
        data = DigitsDataModule(image_size=args.input_size, seed=args.seed)
    elif args.data_root is None:
        raise ValueError(f"--data {args.data} needs --data-root (the data set's folder)")
    else:
        data = ImageDataModule(args.data, args.data_root)
    data.setup()
    x, y = data.splits["train"]
    if x.dtype == torch.uint8:
        x = normalize(x, data.mean, data.std)
    args.in_channels, args.input_size, args.num_classes = x.shape[1], x.shape[-1], data.num_classes
    return x, y


def make_batch(args: argparse.Namespace, data: tuple[Tensor, Tensor] | None, dtype: torch.dtype
               ) -> tuple[Tensor, Tensor]:
    if data is not None:
        pick = torch.randperm(len(data[1]))[: args.batch_size]
        x, y = data[0][pick].to(dtype), data[1][pick]
    else:
        x = torch.randn((args.batch_size, args.in_channels, args.input_size, args.input_size),
                        dtype=dtype)
        y = torch.randint(0, args.num_classes, (args.batch_size,))
    return (x.flatten(1) if args.model == "mlp" else x), y


def verdict(report: dict, min_cosine: float, max_rel_err: float) -> str | None:
    """None if every tensor meets both thresholds, else why not (the worst tensor)."""
    if report["diverged"]:
        return f"diverged: {report['reason']}"
    worst = min(report["tensors"], key=lambda r: r["cosine"])
    if worst["cosine"] < min_cosine:
        return f"{worst['name']} has cosine {worst['cosine']:.8f} < --min-cosine {min_cosine}"
    worst = max(report["tensors"], key=lambda r: r["rel_err"])
    if worst["rel_err"] > max_rel_err:
        return f"{worst['name']} has rel_err {worst['rel_err']:.3e} > --max-rel-err {max_rel_err}"
    return None


def hint(report: dict) -> str:
    """What a failing report's counts suggest."""
    if report["diverged"] or not report["kink_crossings"]:
        return ""
    return (f" ({report['kink_crossings']} units crossed a kink during the relaxation; if that is "
            "the cause, a smaller --beta removes it)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    try:
        data = load_data(args)
        network = build_network(args).to(dtype)
        K = args.K if args.K is not None else network.depth
        ep = EquilibriumPropagation(args.cost, args.perturbation, args.scheme, args.beta,
                                    Dynamics(K, args.rule, args.order, args.alpha),
                                    pool_routing=args.pool_routing)
        x, y = make_batch(args, data, dtype)
    except (ValueError, FileNotFoundError) as err:
        print(f"pcn_ep: error: {err}", file=sys.stderr)
        return 2
    report = gradient_fidelity(network, ep, x, y)
    failure = verdict(report, args.min_cosine, args.max_rel_err)
    report.update(verdict="fail" if failure else "pass", min_cosine_allowed=args.min_cosine,
                  max_rel_err_allowed=args.max_rel_err)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{type(network).__name__}, {args.scheme} {args.perturbation} ({args.cost}), "
              f"beta={args.beta}, K={K}, {args.rule}, {args.order}, alpha={args.alpha}, "
              f"pool routing {args.pool_routing}, {args.dtype}, {args.data} batch of {len(y)}")
        for r in report["tensors"]:
            print(f"  {r['name']:<24} cosine {r['cosine']: .8f}   rel_err {r['rel_err']:.3e}")
        if report["tensors"]:
            print(f"min cosine {report['min_cosine']:.8f}   max rel_err {report['max_rel_err']:.3e}")
            print(f"kink crossings during the relaxation (per layer): "
                  f"{[r['kinks'] for r in report['layers']]}")
            print(f"tied max-pool windows in the free state (per layer): "
                  f"{[r['ties'] for r in report['layers']]}")
            moving = sum(r["ties"] for r in report["layers"] if network.moves(r["layer"]))
            if moving and args.pool_routing == "nudged":
                print("  ties in layers whose input moves make nudged routing differ from backprop "
                      "at any beta; --pool-routing free follows backprop")
        print(f"verdict: FAIL: {failure}{hint(report)}" if failure else
              f"verdict: PASS (every tensor: cosine >= {args.min_cosine}, "
              f"rel_err <= {args.max_rel_err})")
    return 1 if failure else 0

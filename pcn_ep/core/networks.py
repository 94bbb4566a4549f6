"""PCN architectures: a chain of layers with optional skip inputs (the paper's App. B.2).

States are numbered as in the paper: h_0 = x (fixed), h_1..h_L, with h_L the linear output. Layer k
(``layers[k - 1]``) maps h_{k-1} (and its skip source h_s, if any) to the prediction f_k of h_k.

The same ``free_phase`` serves every use: it is the forward pass of backprop (``forward``), the free
equilibrium of EP (it keeps the linear parts c_k and pool indices that the nudged phase reuses) and
the prediction at test time.

A layer is a built-in ``PCNLayer`` (closed-form transposed maps: the fast path) or a ``GenericLayer``
around any module (vector-Jacobian products); one network may mix both (``ResNetPCN`` is all generic).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import math

import torch
from torch import Tensor, nn

from .layers import GenericLayer, Layer, PCNLayer


@dataclass
class FreeState:
    """The feedforward state h*, reduced to what the nudged phase reads (lists indexed by layer).

    - ``a``: pre-activations a*_k (entry 0 is ``None``); h*_k = f_k(a*_k) is recomputed, not stored.
    - ``d``: for a pooled layer whose input can move, c*_k minus its 2×2 window maximum (≤ 0, and 0 at
      the argmax). The nudged pool ``maxpool(d + W δh)`` then *is* δa_k: no rounding against c*_k,
      and c*_k itself is not kept.
    - ``indices``: the max-pool routing of a pooled layer whose inputs never move (layer 1 reads the
      fixed x): it is fixed, so it is kept, compact (``PCNLayer.compact_routes``: the position in
      each window, uint8), and its c*, d are not.
    """

    x: Tensor
    a: list[Tensor | None]
    d: list[Tensor | None]
    indices: list[Tensor | None]
    relu: list[bool]

    @property
    def h(self) -> list[Tensor]:
        """The states h*_0..h*_L (computed on demand)."""
        return [self.x] + [self.h_of(k) for k in range(1, len(self.a))]

    def h_of(self, k: int) -> Tensor:
        """h*_k = f_k(a*_k) for k ≥ 1."""
        return torch.relu(self.a[k]) if self.relu[k] else self.a[k]


class PCN(nn.Module):
    """A predictive coding network over a feedforward chain.

    Args:
        layers: layer k is ``layers[k - 1]``; the last one is the linear output layer.
        skips: ``{target k: source s}`` (or a tuple of sources, for a ``GenericLayer``, whose module
            takes h_{k-1} and then the sources in that order); a ``PCNLayer`` target takes one source
            and must have been built with ``skip_in``.
    """

    def __init__(self, layers: list[Layer], skips: dict[int, int | tuple[int, ...]] | None = None
                 ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.skips = dict(skips or {})
        for target in self.skips:
            extra = self.sources(target)[1:]
            layer = self.layers[target - 1] if 1 <= target <= len(layers) else None
            takes = isinstance(layer, GenericLayer) or (
                len(extra) == 1 and getattr(layer, "skip_weight", None) is not None)
            if not takes or len(set(extra)) < len(extra) or not all(0 <= s < target - 1
                                                                     for s in extra):
                raise ValueError(f"invalid skip {self.skips[target]}->{target}")
        if layers[-1].relu:
            raise ValueError("the output layer must be linear (relu=False), the paper's Eq. 14")

    @property
    def depth(self) -> int:
        """L, the number of layers (= trainable state layers h_1..h_L)."""
        return len(self.layers)

    def sources(self, k: int) -> list[int]:
        """States that layer k reads: h_{k-1}, then its skip sources."""
        extra = self.skips.get(k, ())
        return [k - 1, *((extra,) if isinstance(extra, int) else extra)]

    def readers(self, k: int) -> list[int]:
        """Layers that read state h_k."""
        return [j for j in range(1, self.depth + 1) if k in self.sources(j)]

    def layer_inputs(self, h: list[Tensor], k: int) -> tuple[Tensor, ...]:
        return tuple(h[s] for s in self.sources(k))

    def prediction(self, h: list[Tensor], k: int, copies: int = 1) -> Tensor:
        """f_k from the states ``h`` (flat over ``copies`` nudged copies), as the nudged phase sees it:
        a ``GenericLayer`` uses each copy's batch statistics and updates no running ones."""
        layer, inputs = self.layers[k - 1], self.layer_inputs(h, k)
        if isinstance(layer, GenericLayer):
            return layer.activation(layer.nudged(list(inputs), copies).to(h[0].dtype))
        return layer(*inputs)

    def moves(self, k: int) -> bool:
        """Whether layer k's input can move in the nudged phase (not when it reads x alone)."""
        return any(s > 0 for s in self.sources(k))

    def free_phase(self, x: Tensor) -> FreeState:
        """One forward pass (the paper's Sec. 4): the free equilibrium, global minimum of F at β = 0.

        Keeps a*_k for every layer, the window offsets d_k of pooled layers that can move and the
        pool routing of those that cannot (see ``FreeState``); the states h* live only while used."""
        h, state = [x], FreeState(x, [None], [None], [None], [False])
        for k, layer in enumerate(self.layers, start=1):
            if isinstance(layer, GenericLayer):  # the module as it is: running statistics updated
                a, d, indices = layer.module(*self.layer_inputs(h, k)).to(x.dtype), None, None
            else:
                # Under bf16 autocast the conv runs in bf16; c* is kept in the states' dtype, so
                # the nudged phase's perturbations stay far below bf16's resolution.
                c = layer.linear(*self.layer_inputs(h, k)).to(x.dtype)
                pooled, indices = layer.pool_max(c)
                a, d = layer.add_bias(pooled), None
                if indices is not None and self.moves(k):
                    d, indices = layer.window_offsets(c, pooled), None  # c becomes d in place
                elif indices is not None:
                    indices = layer.compact_routes(indices, c.shape[-1])
            state.a.append(a)
            state.d.append(d)
            state.indices.append(indices)
            state.relu.append(layer.relu)
            h.append(layer.activation(a))
        return state

    def forward(self, x: Tensor) -> Tensor:
        """The logits h_L of the feedforward pass (backprop and evaluation): the same maps as the
        free phase, with no EP bookkeeping in the autograd graph."""
        h = [x]
        for k, layer in enumerate(self.layers, start=1):
            h.append(layer(*self.layer_inputs(h, k), dtype=x.dtype))
        return h[-1]


def _width(channels: int, width_mult: float) -> int:
    if not width_mult > 0 or width_mult == float("inf"):
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")
    return max(1, round(channels * width_mult))


def _conv_stack(
    spec: list[tuple[int, bool]],
    in_channels: int,
    width_mult: float,
    gain: float,
    fan_mode: str,
    bias_init: str,
    skip_in: dict[int, int] | None = None,
) -> list[PCNLayer]:
    """Conv layers from ``[(out_channels, pool), ...]``; ``skip_in`` maps layer number → source channels."""
    layers, channels = [], in_channels
    for k, (out, pool) in enumerate(spec, start=1):
        out = _width(out, width_mult)
        layers.append(
            PCNLayer(
                "conv", channels, out, pool=pool, gain=gain, fan_mode=fan_mode,
                bias_init=bias_init, skip_in=(skip_in or {}).get(k),
            )
        )
        channels = out
    return layers


class MLP(PCN):
    """Dense ReLU layers of the given widths, then a linear output (the parity and toy network).

    Args:
        in_features: size of one input vector.
        num_classes: outputs of the linear output layer.
        hidden: the width of each hidden ReLU layer.
        gain: initialization gain γ of the hidden layers' weights, U(±γ/√fan) (App. B.2).
        output_gain: initialization gain of the output layer (Fig. 3 uses 0.2).
        bias_init: ``uniform`` (PyTorch's default, U(±1/√fan_in)) or ``zeros``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256,),
        gain: float = 1.0,
        output_gain: float = 1.0,
        bias_init: str = "uniform",
    ) -> None:
        sizes = [in_features, *hidden]
        layers = [
            PCNLayer("dense", i, o, gain=gain, bias_init=bias_init)
            for i, o in zip(sizes[:-1], sizes[1:])
        ]
        layers.append(
            PCNLayer("dense", sizes[-1], num_classes, relu=False, gain=output_gain,
                     bias_init=bias_init)
        )
        super().__init__(layers)


class VGG5(PCN):
    """VGG5 of the paper's Table 5 (input 32×32 in the paper).

    ``variant="4conv"`` (default): conv128-pool, conv256-pool, conv512-pool, conv512-pool, dense; five
    weight layers, as the name says and as in PCX's VGG5 and Scellier et al. (2023), which this paper
    builds on. ``variant="5conv"``: the six rows of the extracted table (conv128, conv256-pool,
    conv512-pool, conv512-pool, conv512-pool, dense): six weight layers for a net the paper calls
    "5-layer"; the text (App. B.2) does not say which it ran.
    Convs use fan_in (the paper's Eq. 21); ``output_gain=0.2`` is Fig. 3's variant.

    Args:
        in_channels: channels of the input images (1 for MNIST, 3 for colour).
        num_classes: outputs of the linear output layer.
        input_size: side of the square input images (at least 16: four 2×2 max-pools).
        width_mult: scales every conv's channels (1: 128-256-512-512).
        variant: ``4conv`` (four convs, the default) or ``5conv`` (the extracted table's five).
        gain: initialization gain γ of the hidden layers' weights, U(±γ/√fan) (App. B.2).
        output_gain: initialization gain of the output layer (Fig. 3 uses 0.2).
        conv_fan_mode: the fan of the conv weights' initialization: ``fan_in`` or ``fan_out``.
        bias_init: ``uniform`` (PyTorch's default, U(±1/√fan_in)) or ``zeros``.
    """

    SPECS = {
        "4conv": [(128, True), (256, True), (512, True), (512, True)],
        "5conv": [(128, False), (256, True), (512, True), (512, True), (512, True)],
    }

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        width_mult: float = 1.0,
        variant: str = "4conv",
        gain: float = 1.0,
        output_gain: float = 1.0,
        conv_fan_mode: str = "fan_in",
        bias_init: str = "uniform",
    ) -> None:
        if variant not in self.SPECS:
            raise ValueError(f"VGG5 variant must be one of {sorted(self.SPECS)}, got {variant!r}")
        spec = self.SPECS[variant]
        layers = _conv_stack(spec, in_channels, width_mult, gain, conv_fan_mode, bias_init)
        side = _pooled_side(input_size, sum(pool for _, pool in spec))
        layers.append(
            PCNLayer("dense", layers[-1].weight.shape[0] * side * side, num_classes, relu=False,
                     gain=output_gain, bias_init=bias_init)
        )
        super().__init__(layers)


class VGG10(PCN):
    """VGG10 of the paper's Table 6: 8 convs in 5 pooled stages, dense 2048, linear 1000 (input 224×224).

    Conv weights use fan_out (the paper's Eq. 21). ``width_mult`` scales every conv and the hidden dense
    layer, so tests can run the real topology small.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the linear output layer.
        input_size: side of the square input images (at least 32: five 2×2 max-pools).
        width_mult: scales every conv and the hidden dense layer (1: the paper's widths).
        fc_width: width of the hidden dense layer before ``width_mult``.
        gain: initialization gain γ of the hidden layers' weights, U(±γ/√fan) (App. B.2).
        output_gain: initialization gain of the output layer (Fig. 3 uses 0.2).
        conv_fan_mode: the fan of the conv weights' initialization: ``fan_out`` or ``fan_in``.
        bias_init: ``uniform`` (PyTorch's default, U(±1/√fan_in)) or ``zeros``.
        skips: ``{target layer: source state}`` for strided 1×1 conv skips (``VGG10Skip``).
    """

    SPEC = [(64, True), (128, True), (256, False), (256, True), (512, False), (512, True),
            (512, False), (512, True)]

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        input_size: int = 224,
        width_mult: float = 1.0,
        fc_width: int = 2048,
        gain: float = 1.0,
        output_gain: float = 1.0,
        conv_fan_mode: str = "fan_out",
        bias_init: str = "uniform",
        skips: dict[int, int] | None = None,
    ) -> None:
        skip_in = {t: _width(self.SPEC[s - 1][0], width_mult) for t, s in (skips or {}).items()}
        layers = _conv_stack(self.SPEC, in_channels, width_mult, gain, conv_fan_mode, bias_init,
                             skip_in)
        side = _pooled_side(input_size, 5)
        fc = _width(fc_width, width_mult)
        layers.append(
            PCNLayer("dense", layers[-1].weight.shape[0] * side * side, fc, gain=gain,
                     bias_init=bias_init)
        )
        layers.append(
            PCNLayer("dense", fc, num_classes, relu=False, gain=output_gain, bias_init=bias_init)
        )
        super().__init__(layers, skips)


class VGG10Skip(VGG10):
    """VGG10 with strided 1×1 conv skips from state 2 to layer 5 and from state 5 to layer 8 (§5.5).

    How a skip enters the energy: the skip is part of the target layer's prediction,
    f_k(h_{k-1}, h_s) = ReLU(maxpool(conv3x3(h_{k-1}) + conv1x1_stride2(h_s)) + b_k), so
    ε_k = h_k − f_k(h_{k-1}, h_s) and h_s receives top-down error both from layer s+1 and from layer k.
    The skip is added before the pool, where both paths have the same resolution (stride 2 in both
    skips: 56→28 into layer 5, 28→14 into layer 8's conv output); the paper does not say [?].

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the linear output layer.
        input_size: side of the square input images (at least 32: five 2×2 max-pools).
        width_mult: scales every conv and the hidden dense layer (1: the paper's widths).
        fc_width: width of the hidden dense layer before ``width_mult``.
        gain: initialization gain γ of the hidden layers' weights, U(±γ/√fan) (App. B.2).
        output_gain: initialization gain of the output layer (Fig. 3 uses 0.2).
        conv_fan_mode: the fan of the conv weights' initialization: ``fan_out`` or ``fan_in``.
        bias_init: ``uniform`` (PyTorch's default, U(±1/√fan_in)) or ``zeros``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        input_size: int = 224,
        width_mult: float = 1.0,
        fc_width: int = 2048,
        gain: float = 1.0,
        output_gain: float = 1.0,
        conv_fan_mode: str = "fan_out",
        bias_init: str = "uniform",
    ) -> None:
        super().__init__(in_channels, num_classes, input_size, width_mult, fc_width, gain,
                         output_gain, conv_fan_mode, bias_init, skips={5: 2, 8: 5})


def _pooled_side(input_size: int, pools: int) -> int:
    side = input_size // 2**pools
    if side < 1:
        raise ValueError(f"input_size {input_size} is too small for {pools} 2×2 max-pools")
    return side


NORMS = ("none", "batch", "group", "layer")


def _norm(kind: str, channels: int) -> nn.Module:
    """The normalization after a conv: BatchNorm, GroupNorm with gcd(32, C) groups (32 at ResNet's
    widths), LayerNorm over (C, H, W) written as GroupNorm(1, C), or none."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {kind!r}")
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind in ("group", "layer"):
        return nn.GroupNorm(math.gcd(32, channels) if kind == "group" else 1, channels)
    return nn.Identity()


class Residual(nn.Module):
    """g(h, skip) = body(h) + shortcut(skip), with skip = h when not given: a residual block as one
    layer, or (given a skip source) a join of two states."""

    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, h: Tensor, skip: Tensor | None = None) -> Tensor:
        return self.body(h) + self.shortcut(h if skip is None else skip)


class ResNetPCN(PCN):
    """ResNet-18's layout as a PCN of ``GenericLayer``: stem, residual stages, global average pool,
    linear output (the paper's conclusion, Sec. 7: deep ResNets with normalization as next step).

    One state per residual block: h_k = ReLU(n2(conv2(ReLU(n1(conv1 h_{k-1})))) + shortcut(h_{k-1})),
    the tensor a ResNet passes between blocks (a ReLU output, h_k ≥ 0 as the paper's Eq. 15 wants).
    ResNet-18 has L = 10 layers, the paper's VGG10 depth: K = 10 carries the nudge down to the stem
    (Sec. 5.2's rule of thumb, K = L). Why not a state after each conv: a block's input, middle and
    output states would form a triangle (the shortcut joins the input to the output), an odd cycle,
    so no even/odd sweep (the paper's App. A.1) updates them without moving two neighbours at once.
    Measured (float64, centered, β = 1e-6, one-block ResNet at 1/16 width, no norm): with async
    sweeps and α = 1 the relaxation diverged (relative error against backprop 0.9, 7.9 and 5.5e3 at
    K = 4, 8, 20; sync: 1.4e8 at K = 30); with α = 0.5 it crawled (7e-3 at K = 30). A state per block
    has no such cycle: the nudge reaches the stem in L/2 iterations and EP matches backprop to 1e-7.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the linear output layer.
        input_size: side of the input images (any side works: the average pool adapts).
        width_mult: scales every channel count (1: ResNet-18's 64-128-256-512).
        blocks: residual blocks per stage (ResNet-18: 2, 2, 2, 2); stage i has 64·2^i channels and
            halves the resolution (stride 2) from the second stage on.
        norm: after each conv: ``batch`` (BatchNorm; its batch statistics, see ``GenericLayer``),
            ``group`` (GroupNorm), ``layer`` (LayerNorm over C, H, W) or ``none`` (conv biases).
        stem: ``cifar`` (3×3 conv, stride 1) or ``imagenet`` (7×7 conv, stride 2, then a 3×3
            max-pool, stride 2).
        gain: γ of the conv weights' initialization U(±γ/√fan_in) (the paper's Eq. 21; γ = 1 is
            PyTorch's default).
        output_gain: γ of the output layer's weights (Fig. 3 uses 0.2).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        width_mult: float = 1.0,
        blocks: Sequence[int] = (2, 2, 2, 2),
        norm: str = "batch",
        stem: str = "cifar",
        gain: float = 1.0,
        output_gain: float = 1.0,
    ) -> None:
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if input_size < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"input_size and every entry of blocks must be >= 1, got "
                             f"{input_size!r}, {list(blocks)!r}")
        _norm(norm, 1)  # checks the name

        def conv(cin: int, cout: int, size: int = 3, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, size, stride, padding=size // 2, bias=norm == "none")

        channels = _width(64, width_mult)
        if stem == "cifar":
            first = nn.Sequential(conv(in_channels, channels), _norm(norm, channels))
        else:
            first = nn.Sequential(conv(in_channels, channels, 7, 2), _norm(norm, channels),
                                  nn.MaxPool2d(3, 2, padding=1))
        layers = [GenericLayer(first)]
        for stage, count in enumerate(blocks):
            out = _width(64 * 2**stage, width_mult)
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                shortcut = (nn.Identity() if stride == 1 and channels == out else
                            nn.Sequential(conv(channels, out, 1, stride), _norm(norm, out)))
                body = nn.Sequential(conv(channels, out, 3, stride), _norm(norm, out), nn.ReLU(),
                                     conv(out, out), _norm(norm, out))
                layers.append(GenericLayer(Residual(body, shortcut)))
                channels = out
        head = nn.Linear(channels, num_classes)
        layers.append(GenericLayer(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head),
                                   relu=False))
        for m in nn.ModuleList(layers).modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = (output_gain if m is head else gain) / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.weight, -bound, bound)
        super().__init__(layers)


def as_generic(network: PCN) -> PCN:
    """The same chain of built-in layers rebuilt from plain modules (conv 3×3, max-pool, flatten,
    linear) as ``GenericLayer``s, with the same weights: the VJP path beside the closed form, for
    ``bench --generic`` and the tests that check both give one estimate. Skips are not rebuilt."""
    if network.skips or not all(isinstance(layer, PCNLayer) for layer in network.layers):
        raise ValueError(f"{type(network).__name__} has skips or generic layers: as_generic "
                         "rebuilds a plain chain of built-in layers")
    layers = []
    for layer in network.layers:
        out_features, in_features = layer.weight.shape[:2]
        if layer.kind == "conv":
            core = nn.Conv2d(in_features, out_features, 3, padding=1)
            module = nn.Sequential(core, nn.MaxPool2d(2)) if layer.pool else core
        else:
            core = nn.Linear(in_features, out_features)
            module = nn.Sequential(nn.Flatten(), core)
        with torch.no_grad():
            core.weight.copy_(layer.weight)
            core.bias.copy_(layer.bias)
        layers.append(GenericLayer(module, relu=layer.relu))
    first = network.layers[0].weight
    return PCN(layers).to(device=first.device, dtype=first.dtype)


NETWORKS = {"mlp": MLP, "vgg5": VGG5, "vgg10": VGG10, "vgg10skip": VGG10Skip,
            "resnet18": ResNetPCN}

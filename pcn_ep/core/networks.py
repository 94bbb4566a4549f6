"""PCN architectures: a chain of ``PCNLayer`` with optional skip inputs (the paper's App. B.2).

States are numbered as in the paper: h_0 = x (fixed), h_1..h_L, with h_L the linear output. Layer k
(``layers[k - 1]``) maps h_{k-1} (and its skip source h_s, if any) to the prediction f_k of h_k.

The same ``free_phase`` serves every use: it is the forward pass of backprop (``forward``), the free
equilibrium of EP (it keeps the linear parts c_k and pool indices that the nudged phase reuses) and
the prediction at test time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import PCNLayer


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

    def repeat(self, copies: int) -> "FreeState":
        """Stack ``copies`` copies along the batch (for a caller that passes one β per copy;
        the estimators do not need it: the nudged phase broadcasts one free state over the signs)."""
        if copies == 1:
            return self

        def rep(ts):
            return [None if t is None else torch.cat([t] * copies) for t in ts]

        return FreeState(torch.cat([self.x] * copies), rep(self.a), rep(self.d), rep(self.indices),
                         self.relu)


class PCN(nn.Module):
    """A predictive coding network over a feedforward chain.

    Args:
        layers: layer k is ``layers[k - 1]``; the last one is the linear output layer.
        skips: ``{target k: source s}``; the target layer must have been built with ``skip_in``.
    """

    def __init__(self, layers: list[PCNLayer], skips: dict[int, int] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.skips = dict(skips or {})
        for target, source in self.skips.items():
            if not 0 <= source < target - 1 or self.layers[target - 1].skip_weight is None:
                raise ValueError(f"invalid skip {source}->{target}")
        if layers[-1].relu:
            raise ValueError("the output layer must be linear (relu=False), the paper's Eq. 14")

    @property
    def depth(self) -> int:
        """L, the number of layers (= trainable state layers h_1..h_L)."""
        return len(self.layers)

    def sources(self, k: int) -> list[int]:
        """States that layer k reads: h_{k-1} and its skip source."""
        return [k - 1] + ([self.skips[k]] if k in self.skips else [])

    def readers(self, k: int) -> list[int]:
        """Layers that read state h_k."""
        return [j for j in range(1, self.depth + 1) if k in self.sources(j)]

    def layer_inputs(self, h: list[Tensor], k: int) -> tuple[Tensor, Tensor | None]:
        return h[k - 1], (h[self.skips[k]] if k in self.skips else None)

    def moves(self, k: int) -> bool:
        """Whether layer k's input can move in the nudged phase (not when it reads x alone)."""
        return any(s > 0 for s in self.sources(k))

    def free_phase(self, x: Tensor) -> FreeState:
        """One forward pass (the paper's Sec. 4): the free equilibrium, global minimum of F at β = 0.

        Keeps a*_k for every layer, the window offsets d_k of pooled layers that can move and the
        pool routing of those that cannot (see ``FreeState``); the states h* live only while used."""
        h, state = [x], FreeState(x, [None], [None], [None], [False])
        for k, layer in enumerate(self.layers, start=1):
            # Under bf16 autocast the conv runs in bf16; c* is kept in the states' dtype, so the
            # nudged phase's perturbations stay far below bf16's resolution.
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
    conv512-pool, conv512-pool, conv512-pool, dense). Spec §4 flags the discrepancy.
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


NETWORKS = {"mlp": MLP, "vgg5": VGG5, "vgg10": VGG10, "vgg10skip": VGG10Skip}

"""One PCN layer f_k, with the transposed maps that the nudged phase needs.

A layer computes, from its input state h_{k-1} (and, for a skip target, a second state h_s):

    c_k = W_k * h_{k-1}  [+ S_k * h_s]           linear part, no bias ("pre-pool")
    a_k = maxpool(c_k) + b_k   (or c_k + b_k)    pre-activation
    f_k = ReLU(a_k)            (identity for the output layer)

The bias is added after the pool, which equals pooling (c + b) since b is constant per channel. The
skip enters *before* the pool, inside the linear part, so that the state update stays one linear map
plus one pool (the paper's Sec. 5.5, VGG10Skip; our reading, documented in ``networks.py``).

Besides ``forward`` (used by the free phase and by backprop), a layer exposes the two transposed maps
that equilibrium propagation needs, written out so that a nudge iteration costs exactly one linear map
and one vector-Jacobian product per changing layer, with no autograd graph kept between iterations:

- ``input_vjp``: (∂c/∂inputs)^T applied to a gradient w.r.t. c (a transposed convolution / matmul);
- ``param_grads``: (∂a/∂θ)^T applied to a gradient w.r.t. a (weight and bias gradients).

``gradcheck`` and the tests compare both against autograd through ``forward``.

``GenericLayer`` makes any ``nn.Module`` g_k a layer, f_k = ReLU(g_k(inputs)) (or g_k for the output):
it has no closed form, and the nudged phase takes its transposed maps from vector-Jacobian products
of g_k at the current states (``torch.func.vjp``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.nn.modules.batchnorm import _BatchNorm


class Layer(nn.Module):
    """What every layer shares: f_k = ReLU(a_k) for a hidden layer, a_k for the linear output."""

    relu: bool

    def activation(self, a: Tensor) -> Tensor:
        return torch.relu(a) if self.relu else a


class PCNLayer(Layer):
    """A conv 3×3 (stride 1, padding 1) or dense layer, optional 2×2 max-pool, ReLU or linear output.

    Args:
        kind: ``"conv"`` or ``"dense"``. A dense layer flattens its input.
        in_features: input channels for a conv, input units for a dense layer.
        out_features: output channels for a conv, output units for a dense layer.
        pool: 2×2 max-pool with stride 2 after the conv (before the ReLU, the paper's Eq. 13).
        relu: ReLU for hidden layers; ``False`` for the linear output layer (the paper's Eq. 14).
        skip_in: channels of a skip source; adds a 1×1 conv with stride ``skip_stride`` to ``c``.
        gain: γ of the paper's Eq. 21, weights ~ U(−c, c) with c = γ / sqrt(fan).
        fan_mode: ``"fan_in"`` or ``"fan_out"`` (convs only; dense layers always use fan_in, the
            paper's Eq. 21).
        bias_init: ``"uniform"`` (PyTorch's default, U(±1/sqrt(fan_in)); the paper does not say [?]) or
            ``"zeros"``.
    """

    def __init__(
        self,
        kind: str,
        in_features: int,
        out_features: int,
        *,
        pool: bool = False,
        relu: bool = True,
        skip_in: int | None = None,
        skip_stride: int = 2,
        gain: float = 1.0,
        fan_mode: str = "fan_in",
        bias_init: str = "uniform",
    ) -> None:
        super().__init__()
        if kind not in ("conv", "dense"):
            raise ValueError(f"layer kind must be 'conv' or 'dense', got {kind!r}")
        if kind == "dense" and (pool or skip_in):
            raise ValueError("a dense layer has no pool and no skip input")
        if fan_mode not in ("fan_in", "fan_out"):
            raise ValueError(f"fan_mode must be 'fan_in' or 'fan_out', got {fan_mode!r}")
        if bias_init not in ("uniform", "zeros"):
            raise ValueError(f"bias_init must be 'uniform' or 'zeros', got {bias_init!r}")
        self.kind, self.pool, self.relu, self.skip_stride = kind, pool, relu, skip_stride
        shape = (out_features, in_features, 3, 3) if kind == "conv" else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.skip_weight = (
            nn.Parameter(torch.empty(out_features, skip_in, 1, 1)) if skip_in else None
        )
        self.reset_parameters(gain, fan_mode if kind == "conv" else "fan_in", bias_init)

    def reset_parameters(self, gain: float, fan_mode: str, bias_init: str) -> None:
        """The paper's Eq. 21: U(−γ/sqrt(fan), +γ/sqrt(fan)), fan = ch·kh·kw of the chosen side."""
        for w in (self.weight, self.skip_weight):
            if w is None:
                continue
            receptive = math.prod(w.shape[2:])
            fan = (w.shape[1] if fan_mode == "fan_in" else w.shape[0]) * receptive
            nn.init.uniform_(w, -gain / math.sqrt(fan), gain / math.sqrt(fan))
        if bias_init == "zeros":
            nn.init.zeros_(self.bias)
        else:
            bound = 1.0 / math.sqrt(math.prod(self.weight.shape[1:]))
            nn.init.uniform_(self.bias, -bound, bound)

    # -- forward pieces -------------------------------------------------------------------------
    def linear(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """c = W * x [+ S * skip], without bias. Linear in (x, skip): the nudged phase feeds it
        the perturbation h − h* and adds the cached free c*, which keeps small nudges exact."""
        if self.kind == "dense":
            return F.linear(x.flatten(1), self.weight)
        c = F.conv2d(x, self.weight, padding=1)
        if skip is not None:  # None: the skip input contributes nothing (a perturbation not yet there)
            c = c + F.conv2d(skip, self.skip_weight, stride=self.skip_stride)
        return c

    def pool_bias(self, c: Tensor) -> tuple[Tensor, Tensor | None]:
        """a = maxpool(c) + b; also returns the argmax indices the transposed map routes through."""
        pooled, indices = self.pool_max(c)
        return self.add_bias(pooled), indices

    def pool_max(self, c: Tensor) -> tuple[Tensor, Tensor | None]:
        """(maxpool(c), argmax indices), or (c, None) without a pool."""
        return F.max_pool2d(c, 2, 2, return_indices=True) if self.pool else (c, None)

    def add_bias(self, c: Tensor) -> Tensor:
        return c + (self.bias.view(-1, 1, 1) if self.kind == "conv" else self.bias)

    @staticmethod
    def compact_routes(indices: Tensor, width: int) -> Tensor:
        """Max-pool argmax indices (int64, flat over a row of ``width``) → the position inside each
        2×2 window, 0..3 (uint8): an eighth of the memory, for a routing kept through a step."""
        h, w = indices.shape[-2:]
        offset = indices - _window_corners(h, w, width, indices.device)
        return (offset // width * 2 + offset % width).to(torch.uint8)

    @staticmethod
    def expand_routes(routes: Tensor, width: int) -> Tensor:
        """The inverse of ``compact_routes``: int64 indices for the pooling backward kernel."""
        h, w = routes.shape[-2:]
        r = routes.long()
        return _window_corners(h, w, width, routes.device) + (r >> 1) * width + (r & 1)

    @staticmethod
    def window_offsets(c: Tensor, pooled: Tensor) -> Tensor:
        """c minus its 2×2 window maximum, in place (c is consumed): ≤ 0, exactly 0 at the argmax.

        maxpool(d + δc) = maxpool(c + δc) − maxpool(c) exactly where the argmax does not move, so
        the nudged phase gets δa without subtracting two large numbers. Rows and columns that no
        window covers (odd sides) are left as they are: no pool reads them."""
        h, w = pooled.shape[-2:]
        windows = c[..., : 2 * h, : 2 * w].unflatten(-1, (w, 2)).unflatten(-3, (h, 2))
        windows -= pooled[..., :, None, :, None]
        return c

    @staticmethod
    def tied_windows(c: Tensor) -> Tensor:
        """Per example, the 2×2 windows of c whose maximum is reached more than once: there the
        max-pool's derivative is a choice (the first winner, for backprop and the free routing)."""
        h, w = c.shape[-2] // 2, c.shape[-1] // 2
        windows = c[..., : 2 * h, : 2 * w].unflatten(-1, (w, 2)).unflatten(-3, (h, 2))
        top = windows.amax((-3, -1), keepdim=True)
        return ((windows == top).sum((-3, -1)) > 1).flatten(1).sum(1)

    def forward(self, x: Tensor, skip: Tensor | None = None, dtype: torch.dtype | None = None
                ) -> Tensor:
        """f(x, skip); ``dtype`` casts the linear part (bf16 under autocast) back to the states'."""
        c = self.linear(x, skip)
        return self.activation(self.pool_bias(c if dtype is None else c.to(dtype))[0])

    # -- transposed maps ------------------------------------------------------------------------
    def unpool(self, grad_a: Tensor, indices: Tensor | None, c: Tensor | torch.Size) -> Tensor:
        """Gradient w.r.t. a → gradient w.r.t. c (given as c or its shape): max-pool routes it to the
        argmax. (The pooling backward kernel itself, which is allowed in deterministic mode unlike
        ``max_unpool2d``; it reads only the shape of c, so a shape is passed as a broadcast zero.)"""
        if not self.pool:
            return grad_a
        if not isinstance(c, Tensor):
            c = grad_a.new_empty(()).expand(c)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad_a, c, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        )

    def input_vjp(
        self, grad_c: Tensor, x_shape: torch.Size, skip_shape: torch.Size | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(∂c/∂x)^T grad_c and (∂c/∂skip)^T grad_c."""
        if self.kind == "dense":
            return (grad_c @ self.weight).view(x_shape), None
        g, w = _compute(grad_c, self.weight)
        grad_x = conv2d_input(x_shape, w, g, padding=1).to(grad_c.dtype)
        grad_skip = None
        if self.skip_weight is not None:
            g, s = _compute(grad_c, self.skip_weight)
            grad_skip = conv2d_input(skip_shape, s, g, stride=self.skip_stride).to(grad_c.dtype)
        return grad_x, grad_skip

    def param_grads(
        self, x: Tensor, skip: Tensor | None, grad_a: Tensor, grad_c: Tensor
    ) -> list[Tensor]:
        """(∂a/∂θ)^T grad_a for every parameter, in ``self.parameters()`` order."""
        if self.kind == "dense":
            return [grad_c.t() @ x.flatten(1), grad_a.sum(0)]
        xc, gc = _compute(x, grad_c)
        grads = [
            conv2d_weight(xc, self.weight.shape, gc, padding=1).to(grad_c.dtype),
            grad_a.sum((0, 2, 3)),
        ]
        if self.skip_weight is not None:
            sc, gc = _compute(skip, grad_c)
            grads.append(conv2d_weight(sc, self.skip_weight.shape, gc, stride=self.skip_stride)
                         .to(grad_c.dtype))
        return grads


class GenericLayer(Layer):
    """Any module g_k as PCN layer k: f_k = ReLU(g_k(inputs)) when hidden, g_k(inputs) for the output.

    The nudged phase needs, at the current states, a_k = g_k(inputs), the transposed map
    (∂a_k/∂inputs)^T (for Δ of the layers it reads, the paper's Eq. 17) and (∂a_k/∂θ_k)^T (for
    ∂F/∂θ_k); here they are vector-Jacobian products of g_k (``torch.func.vjp``), so any
    differentiable module works. The price against ``PCNLayer``: one forward of g_k per refresh, and
    δa_k = g_k(h) − a*_k is a difference of absolute values (exact to the rounding of a*_k, not to
    the perturbation's own digits). Kinks are counted at the output ReLU and at every ``nn.ReLU``
    module inside g_k (``inner_signs``); other kinks inside g_k (a max-pool's winner, ``F.relu``)
    are not.

    Batch statistics. BatchNorm in training mode makes g_k a function of the whole batch. The batch is
    then one system, F summed over it, and what EP must match is backprop of the training forward:
    - the free phase *is* that forward (the module called as it is): batch statistics of the free
      states, and the running statistics updated there, once per step, as backprop's forward does;
    - each nudged copy (one sign of β in centered EP) is its own system: g_k uses the statistics of
      that copy's current states, and never updates the running statistics.
    So g_k is exactly the function backprop differentiates, its VJPs carry the statistics' terms
    that couple the examples, and the estimate tends to backprop's gradient as β → 0 (checked in
    float64 by tests/test_generic_layers.py). Freezing the free statistics in the nudged phase would
    be another function, whose gradient lacks those terms; pooling both copies' statistics would make
    the +β and −β systems nudge each other. The random scheme draws signs per example inside one
    copy: there an example's error also carries its neighbours' nudges, which 1/β_i does not undo,
    so its estimate is unbiased over the signs but not exact per draw (forward, backward and
    centered are). In eval mode BatchNorm uses its running statistics: per example, nothing couples.
    GroupNorm and LayerNorm normalize each example alone and need nothing of this.

    Args:
        module: g_k, called with the states the layer reads: h_{k-1}, then its skip sources in the
            order ``PCN``'s ``skips`` lists them. Its parameters are θ_k.
        relu: ReLU for a hidden layer; ``False`` for the linear output layer (the paper's Eq. 14).
        batch_coupled: whether g_k mixes the examples of a batch (then each nudged copy runs
            apart); ``None``: whenever it holds a BatchNorm in training mode.
    """

    pool = False  # no closed-form max-pool routing: a pool inside g_k is differentiated by the VJP

    def __init__(self, module: nn.Module, relu: bool = True, batch_coupled: bool | None = None
                 ) -> None:
        super().__init__()
        self.module, self.relu, self.batch_coupled = module, relu, batch_coupled

    @property
    def weight(self) -> Tensor:
        """g_k's first parameter: what code reading ``layers[0].weight`` (input channels) or
        ``layers[-1].weight`` (classes) finds in a conv stem or a linear head."""
        return next(self.module.parameters())

    def forward(self, *inputs: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """f(inputs), the module as it is (training mode: batch statistics, running ones updated)."""
        a = self.module(*inputs)
        return self.activation(a if dtype is None else a.to(dtype))

    def couples(self) -> bool:
        if self.batch_coupled is not None:
            return self.batch_coupled
        return any(isinstance(m, _BatchNorm) and m.training for m in self.module.modules())

    def nudged(self, inputs: list[Tensor], copies: int, params: dict | None = None) -> Tensor:
        """a = g_k(inputs) for inputs flat over the nudged copies (copies·batch, ...), each copy with
        its own batch statistics and no running statistics updated; ``params`` replace θ_k."""
        frozen = {f"{name}.{b}": None for name, m in self.module.named_modules()
                  if isinstance(m, _BatchNorm) and m.training and m.running_mean is not None
                  for b in ("running_mean", "running_var", "num_batches_tracked")}

        def g(*xs: Tensor) -> Tensor:
            return functional_call(self.module, {**(params or {}), **frozen}, xs)

        if copies == 1 or not self.couples():
            return g(*inputs)
        parts = [x.unflatten(0, (copies, -1)) for x in inputs]
        return torch.cat([g(*(p[c] for p in parts)) for c in range(copies)])

    def inner_signs(self, inputs: list[Tensor], copies: int) -> list[Tensor]:
        """Where the input of each ``nn.ReLU`` inside g_k is > 0, at ``inputs`` (a diagnostic: a
        change from the free state is a kink crossed inside g_k)."""
        signs: list[Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda _, args: signs.append(args[0] > 0))
                 for m in self.module.modules() if isinstance(m, nn.ReLU)]
        try:
            self.nudged(inputs, copies)
        finally:
            for hook in hooks:
                hook.remove()
        return signs

    def input_vjp(self, inputs: list[Tensor], copies: int):
        """(a, pullback): a = ``nudged(inputs)``, and grad_a ↦ (∂a/∂inputs)^T grad_a, one tensor per
        input, in grad_a's dtype."""
        # x.view_as(x): the module sees non-leaf inputs, so hooks that ask the autograd engine
        # about them (FlopCounterMode's module tracker) work inside the VJP's autograd.grad
        a, pullback = vjp(lambda *xs: self.nudged([x.view_as(x) for x in xs], copies), *inputs)

        def transposed(grad_a: Tensor) -> tuple[Tensor, ...]:
            return tuple(g.to(grad_a.dtype) for g in pullback(grad_a.to(a.dtype)))

        return a, transposed

    def param_grads(self, inputs: list[Tensor], grad_a: Tensor, copies: int) -> list[Tensor]:
        """(∂a/∂θ)^T grad_a at ``inputs``, for every parameter, in ``self.parameters()`` order.

        Runs g_k once more, after the relaxation, rather than taking the VJP over (inputs, θ) in
        every refresh: that would add the weight-gradient work to each of the K iterations' VJPs,
        and the last refresh of layer k need not be at the final states (a lower state may move
        after it), while this forward is one per layer and step."""
        names = [name for name, _ in self.module.named_parameters()]
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        a, pullback = vjp(lambda p: self.nudged(inputs, copies, p), params)
        grads = pullback(grad_a.to(a.dtype))[0]
        return [grads[name] for name in names]


def _window_corners(h: int, w: int, width: int, device: torch.device) -> Tensor:
    """Flat index of each 2×2 window's top-left element in a row of ``width``, shape (h, w)."""
    rows = torch.arange(h, device=device) * (2 * width)
    return rows[:, None] + torch.arange(w, device=device) * 2


def _compute(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to the autocast dtype when autocast is on: the transposed convolutions are not on
    autocast's op list, and they should run in bf16 like the forward ones."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)

"""The sparse-parity write-up's own model: a continuous Hopfield network trained with classic EP.

Scellier & Bengio (2017) as the write-up describes it (documentation: Sparse parity): input x
clamped, one hidden tanh layer s_h and one tanh output s_o, symmetric weights W1 (x–h) and w2 (h–o).
Both phases are damped fixed-point iterations with step α, starting from zero (free) or from the free state
(nudged, with −β(s_o − t) added inside the output tanh, t = ±1):

    s_h ← (1 − α) s_h + α tanh(x W1 + b1 + s_o w2^T)
    s_o ← (1 − α) s_o + α tanh(s_h w2 + b2 [− β (s_o − t)])

and the contrastive update ΔW = (η/β) (ρ(s)ρ(s)^T at the nudged state − at the free state), ρ = id
on these already-squashed states. ``HopfieldEP`` has the estimators' interface: its surrogate's
gradient is −ΔW/η, so SGD with learning rate η applies exactly that update.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .estimators import Estimate


class HopfieldNet(nn.Module):
    """x → tanh hidden (``hidden`` units) → one tanh output; W ~ N(0, 1/fan_in), zero biases."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(in_features, hidden) / math.sqrt(in_features))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, 1) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(1))


class HopfieldEP:
    """Free and nudged relaxations of ``HopfieldNet``, contrastive weight update.

    Labels ``y`` are class indices {0, 1} (t = 2y − 1); ``Estimate.logits`` is [−s_o, s_o], so the
    argmax is the sign of the free output, the write-up's prediction.
    """

    def __init__(self, beta: float = 0.2, free_steps: int = 30, nudge_steps: int = 30,
                 step_size: float = 0.5) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.beta, self.free_steps, self.nudge_steps, self.alpha = beta, free_steps, nudge_steps, step_size

    def relax(self, net: HopfieldNet, x: Tensor, steps: int, s_h: Tensor, s_o: Tensor,
              t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, drive = self.alpha, x @ net.W1 + net.b1
        for _ in range(steps):
            s_h = (1 - a) * s_h + a * torch.tanh(drive + s_o @ net.w2.T)
            pre = s_h @ net.w2 + net.b2
            if t is not None:
                pre = pre - self.beta * (s_o - t)
            s_o = (1 - a) * s_o + a * torch.tanh(pre)
        return s_h, s_o

    def free_phase(self, net: HopfieldNet, x: Tensor) -> tuple[Tensor, Tensor]:
        zeros = x.new_zeros
        return self.relax(net, x, self.free_steps, zeros(len(x), net.b1.numel()), zeros(len(x), 1))

    def predict(self, net: HopfieldNet, x: Tensor) -> Tensor:
        o = self.free_phase(net, x)[1]
        return torch.cat([-o, o], 1)

    def __call__(self, net: HopfieldNet, x: Tensor, y: Tensor) -> Estimate:
        with torch.no_grad():
            t = (2 * y - 1).to(x.dtype).view(-1, 1)
            h0, o0 = self.free_phase(net, x)
            h1, o1 = self.relax(net, x, self.nudge_steps, h0, o0, t)
            scale = -1.0 / (self.beta * len(x))
            grads = {
                "W1": scale * x.T @ (h1 - h0),
                "b1": scale * (h1 - h0).sum(0),
                "w2": scale * (h1.T @ o1 - h0.T @ o0),
                "b2": scale * (o1 - o0).sum(0),
            }
            loss = 0.5 * (o0 - t).pow(2).mean()
        surrogate = sum((grads[name] * p).sum() for name, p in net.named_parameters())
        finite = torch.isfinite(loss + surrogate.detach())
        return Estimate(surrogate, torch.cat([-o0, o0], 1), loss, finite)

"""Shared test helpers: EP vs backprop gradients on one network and batch."""
import torch
import torch.nn.functional as F

from pcn_ep.core import Backprop, Dynamics, EquilibriumPropagation


def ep_estimator(cost="ce", scheme="centered", beta=1e-3, K=10, rule="mod-pgd", order="async",
                 alpha=1.0, perturbation="nudge", **kw):
    return EquilibriumPropagation(cost, perturbation, scheme, beta, Dynamics(K, rule, order, alpha),
                                  **kw)


def compare(network, x, y, ep):
    """(cosines, relative errors, kink crossings) of EP against backprop, per parameter tensor."""
    params = list(network.parameters())
    g_bp = torch.autograd.grad(Backprop(ep.cost.name)(network, x, y).surrogate, params)
    ep.count_kinks = True
    estimate = ep(network, x, y)
    g_ep = torch.autograd.grad(estimate.surrogate, params)
    cos = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(g_ep, g_bp)]
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(g_ep, g_bp)]
    return cos, rel, sum(estimate.kinks)


def batch(shape, num_classes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype),
            torch.randint(0, num_classes, (shape[0],), generator=g))

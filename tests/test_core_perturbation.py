"""Carrying perturbations (h − h*) keeps small nudges exact; the compact free state is lossless."""
import pytest
import torch
import torch.nn.functional as F

from helpers import batch, compare, ep_estimator
from pcn_ep.core import VGG5, VGG10, PCNLayer
from pcn_ep.core.equilibrium import schedule


@pytest.mark.parametrize("side", [8, 7])
def test_compact_routes_round_trip_and_window_offsets(side):
    torch.manual_seed(0)
    c = torch.randn(2, 3, side, side)
    c[0, 0, :2, :2] = 1.0  # a tie: the first maximum wins, as in max_pool2d
    pooled, indices = F.max_pool2d(c, 2, 2, return_indices=True)
    routes = PCNLayer.compact_routes(indices, side)
    assert routes.dtype == torch.uint8 and int(routes.max()) <= 3
    assert torch.equal(PCNLayer.expand_routes(routes, side), indices)
    d = PCNLayer.window_offsets(c.clone(), pooled)
    again, same = F.max_pool2d(d, 2, 2, return_indices=True)
    assert torch.equal(again, torch.zeros_like(again)) and torch.equal(same, indices)
    nudge = 1e-3 * torch.randn_like(c)  # maxpool(d + δc) = maxpool(c + δc) − maxpool(c)
    torch.testing.assert_close(F.max_pool2d(d + nudge, 2, 2), F.max_pool2d(c + nudge, 2, 2) - pooled)


def test_float32_small_nudge_keeps_float64_fidelity():
    """β = 1e-4 in float32: with absolute states the first layers' h − h* would be rounding noise;
    carried perturbations keep every layer's cosine to backprop at float64 EP's."""
    torch.manual_seed(0)
    net = VGG10(3, 10, input_size=32, width_mult=0.25)
    x, y = batch((4, 3, 32, 32), 10, dtype=torch.float32)
    cos32, _, _ = compare(net, x, y, ep_estimator(beta=1e-4, K=10))
    cos64, _, _ = compare(net.double(), x.double(), y, ep_estimator(beta=1e-4, K=10))
    assert max(abs(a - b) for a, b in zip(cos32, cos64)) < 1e-3, (cos32, cos64)


def test_schedule_is_the_wavefront():
    """VGG5 (L = 5), async: the output moves at iteration 1, layers 4 and 3 at 2, 2 and 1 at 3."""
    net = VGG5(3, 10, 32, width_mult=0.125)
    sources = tuple(tuple(net.sources(k)) for k in range(1, 6))
    (prefix, steady, repeats), error_layers, _ = schedule(sources, 3, "async", False)
    updates = [[u for _, _, u in groups] for groups in [*prefix, *[steady] * repeats]]
    assert updates == [[[], [5]], [[4], [3, 5]], [[2, 4], [1, 3, 5]]]
    assert error_layers == [1, 2, 3, 4, 5]
    assert schedule(sources, 3, "async", False) is schedule(sources, 3, "async", False)


def test_a_huge_K_plans_only_until_the_wavefront_settles():
    """Past the iteration where every layer moves, iterations repeat: K = 1e9 plans instantly."""
    net = VGG5(3, 10, 32, width_mult=0.125)
    sources = tuple(tuple(net.sources(k)) for k in range(1, 6))
    (prefix, steady, repeats), _, _ = schedule(sources, 10**9, "async", False)
    assert len(prefix) <= 5 and len(prefix) + repeats == 10**9
    (short, last, n), _, _ = schedule(sources, 12, "async", False)
    assert [*short, *[last] * n] == [*prefix, *[steady] * (12 - len(prefix))]

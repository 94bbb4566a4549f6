"""Energy, free state, nudge dynamics, layers and architectures of the core library."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import batch, ep_estimator
from pcn_ep.core import (MLP, VGG5, VGG10, Dynamics, PCNLayer, VGG10Skip, energy, get_cost,
                         nudged_phase)
from pcn_ep.tools.gradcheck import main as gradcheck


def test_free_state_has_zero_energy_and_zero_parameter_gradient():
    torch.manual_seed(0)
    net = VGG10Skip(3, 10, input_size=32, width_mult=0.125).double()
    x, y = batch((3, 3, 32, 32), 10)
    with torch.no_grad():
        free = net.free_phase(x)
    e, c = energy(net, [h.detach() for h in free.h], y, get_cost("ce"))
    assert torch.equal(e, torch.zeros_like(e)) and (c > 0).all()
    grads = torch.autograd.grad(e.sum(), list(net.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_mod_pgd_and_pgd_differ_only_where_a_negative_and_drive_positive():
    """Sync, L = 2: iteration 1 nudges h_2; iteration 2 moves h_1 by the same drive under both
    rules, so the two states may differ only where a_1 < 0 and Δ_1 > 0 (spec §3.2)."""
    torch.manual_seed(0)
    net = MLP(6, 4, hidden=(64,)).double()
    x, y = batch((16, 6), 4)
    betas = torch.full((16,), 2.0, dtype=torch.float64)
    with torch.no_grad():
        free = net.free_phase(x)
        one = nudged_phase(net, free, y, betas, get_cost("mse"), Dynamics(1, order="sync"))
        states = {rule: nudged_phase(net, free, y, betas, get_cost("mse"),
                                     Dynamics(2, rule, "sync")).h[1] for rule in ("mod-pgd", "pgd")}
    drive = (one.h[2] - free.a[2]) @ net.layers[1].weight  # Δ_1 = W_2^T ε_2
    allowed = (free.a[1] < 0) & (drive > 0)
    differs = states["mod-pgd"] != states["pgd"]
    assert differs.any() and allowed.any()
    assert not (differs & ~allowed).any()
    torch.testing.assert_close(states["mod-pgd"], torch.relu(free.a[1] + drive))


@pytest.mark.parametrize("K, reaches_layer_1", [(2, False), (3, True)])
def test_perturbation_travels_two_layers_per_async_iteration(K, reaches_layer_1):
    """VGG5 (L = 5): the nudge reaches h_5 at iteration 1, h_4 and h_3 at 2, h_2 and h_1 at 3."""
    torch.manual_seed(0)
    net = VGG5(3, 10, 32, width_mult=0.125).double()
    x, y = batch((2, 3, 32, 32), 10)
    grads = torch.autograd.grad(ep_estimator(K=K)(net, x, y).surrogate, list(net.parameters()))
    first = grads[:2]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in first) != reaches_layer_1
    assert grads[-2].abs().sum() > 0


def test_clamping_sets_the_output_as_eq_8():
    torch.manual_seed(0)
    net = MLP(8, 5, hidden=(16, 16)).double()
    x, y = batch((4, 8), 5)
    betas = torch.tensor([0.3, 0.3, -0.2, 0.5], dtype=torch.float64)
    with torch.no_grad():
        free = net.free_phase(x)
        nudged = nudged_phase(net, free, y, betas, get_cost("mse"), Dynamics(4), "clamp")
    expected = (1 - betas[:, None]) * free.h[-1] + betas[:, None] * F.one_hot(y, 5).double()
    torch.testing.assert_close(nudged.h[-1], expected, rtol=0, atol=1e-15)
    assert not torch.equal(nudged.h[1], free.h[1])  # the hidden layers relaxed towards it


def test_trace_records_energy_per_iteration():
    torch.manual_seed(0)
    net = VGG5(3, 10, 32, width_mult=0.125)
    x, y = batch((4, 3, 32, 32), 10, dtype=torch.float32)
    estimate = ep_estimator(beta=0.05, K=6, trace=True)(net, x, y)
    assert len(estimate.trace) == 7
    e0, _ = estimate.trace[0]
    assert torch.equal(e0, torch.zeros_like(e0))  # K = 0 is the free state
    assert (estimate.trace[-1][0] > 0).all()


def test_nudge_iteration_computes_each_layer_map_at_most_once():
    """Counts the linear maps and transposed maps per layer during one centered EP step."""
    torch.manual_seed(0)
    net = VGG10(3, 10, input_size=32, width_mult=0.125)
    x, y = batch((2, 3, 32, 32), 10, dtype=torch.float32)
    calls = {"linear": [0] * 10, "vjp": [0] * 10}
    for i, layer in enumerate(net.layers):
        for name in calls:
            method = getattr(layer, "linear" if name == "linear" else "input_vjp")

            def counted(*args, _m=method, _i=i, _n=name, **kw):
                calls[_n][_i] += 1
                return _m(*args, **kw)
            setattr(layer, "linear" if name == "linear" else "input_vjp", counted)
    K = 10
    ep_estimator(beta=0.05, K=K)(net, x, y)
    free_pass = 1
    assert calls["linear"][0] == free_pass  # h_0 = x never changes
    assert all(n <= free_pass + K + 1 for n in calls["linear"])
    assert all(n <= K for n in calls["vjp"]) and calls["vjp"][0] == 0
    # wavefront: fewer maps than K per layer in the lower layers, whole K only at the top
    assert sum(calls["linear"]) < 10 * (K + 1)


@pytest.mark.parametrize("kind, pool, skip", [("conv", False, False), ("conv", True, False),
                                              ("conv", True, True), ("dense", False, False)])
def test_layer_transposed_maps_equal_autograd(kind, pool, skip):
    torch.manual_seed(0)
    layer = PCNLayer(kind, 4 if kind == "conv" else 256, 6, pool=pool,
                     skip_in=3 if skip else None).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True) if skip else None
    c = layer.linear(x, s)
    a, indices = layer.pool_bias(c)
    grad_a = torch.randn_like(a)
    inputs = [x] + ([s] if skip else []) + list(layer.parameters())
    expected = torch.autograd.grad(a, inputs, grad_a)
    grad_c = layer.unpool(grad_a, indices, c.detach())
    gx, gs = layer.input_vjp(grad_c, x.shape, s.shape if skip else None)
    got = [gx] + ([gs] if skip else []) + layer.param_grads(x, s, grad_a, grad_c)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("fan_mode", ["fan_in", "fan_out"])
def test_initialization_bound_follows_eq_21(fan_mode):
    torch.manual_seed(0)
    layer = PCNLayer("conv", 16, 32, gain=0.5, fan_mode=fan_mode)
    fan = (16 if fan_mode == "fan_in" else 32) * 9
    bound = 0.5 / math.sqrt(fan)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    net = VGG5(3, 10, 32, width_mult=0.25, output_gain=0.2)
    out = net.layers[-1].weight
    assert out.abs().max() <= 0.2 / math.sqrt(out.shape[1]) < 1.0 / math.sqrt(out.shape[1])
    vgg10 = VGG10(width_mult=0.0625, input_size=32)
    w = vgg10.layers[1].weight
    assert w.abs().max() <= 1 / math.sqrt(w.shape[0] * 9)  # VGG10 convs use fan_out


def test_vgg10_state_shapes_at_224():
    net = VGG10(width_mult=1 / 16)
    with torch.no_grad():
        h = net.free_phase(torch.randn(1, 3, 224, 224)).h
    sides = [t.shape[-1] for t in h[1:9]]
    assert sides == [112, 56, 56, 28, 28, 14, 14, 7]
    assert h[9].shape == (1, 128) and h[10].shape == (1, 1000)
    full = VGG10()
    assert full.layers[8].weight.shape == (2048, 512 * 7 * 7)
    assert [layer.weight.shape[0] for layer in full.layers[:8]] == [64, 128, 256, 256, 512, 512,
                                                                   512, 512]
    skip = VGG10Skip(width_mult=1 / 16)
    assert skip.skips == {5: 2, 8: 5}
    assert skip.layers[4].skip_weight.shape[-2:] == (1, 1)


def test_vgg5_readings():
    assert VGG5().depth == 5 and VGG5(variant="5conv").depth == 6
    with pytest.raises(ValueError, match="variant"):
        VGG5(variant="3conv")


@pytest.mark.parametrize("bad, match", [(dict(beta=0.0), "beta"), (dict(K=0), "K"),
                                        (dict(scheme="sideways"), "scheme"),
                                        (dict(rule="newton"), "rule"), (dict(alpha=1.5), "alpha")])
def test_impossible_settings_fail_with_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        ep_estimator(**bad)


def test_gradcheck_cli_json(capsys):
    assert gradcheck(["--model", "vgg5", "--width-mult", "0.125", "--batch-size", "2", "--json",
                      "--beta", "1e-6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"tensors", "layers", "min_cosine", "max_rel_err", "verdict"} <= report.keys()
    assert len(report["tensors"]) == 10 and report["tensors"][0]["name"] == "layers.0.weight"
    assert [r["layer"] for r in report["layers"]] == [1, 2, 3, 4, 5]
    assert report["min_cosine"] >= 0.99999 and report["max_rel_err"] <= 1e-4
    assert report["verdict"] == "pass"


def test_gradcheck_verdict_follows_the_thresholds(capsys):
    """Synchronous α = 1 gives a wrong gradient (cosine < 0 on this draw): a FAIL verdict, exit 1,
    unless the user's thresholds allow it."""
    assert gradcheck(["--order", "sync", "--batch-size", "2"]) == 1
    out = capsys.readouterr().out
    assert "verdict: FAIL: layers." in out and "< --min-cosine 0.999" in out
    assert gradcheck(["--order", "sync", "--batch-size", "2", "--min-cosine", "-1",
                      "--max-rel-err", "inf"]) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    assert gradcheck(["--batch-size", "2", "--max-rel-err", "1e-12"]) == 1
    assert "> --max-rel-err 1e-12" in capsys.readouterr().out


def test_gradcheck_reports_divergence_instead_of_crashing(capsys):
    code = gradcheck(["--order", "sync", "--K", "50", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["diverged"] and "blew up" in report["reason"]


def test_gradcheck_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        gradcheck(["--K", "0"])
    assert stop.value.code == 2 and "argument --K" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradcheck(["--scheme", "sideways"])

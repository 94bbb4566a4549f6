"""Any module as a PCN layer (``GenericLayer``): VJPs of g_k in place of the closed-form maps."""
import pytest
import torch
from torch import nn

from helpers import batch, compare, ep_estimator
from pcn_ep.core import PCN, VGG5, GenericLayer, PCNLayer, as_generic


SETTINGS = [  # (cost, scheme, rule, order, alpha, perturbation)
    ("ce", "centered", "mod-pgd", "async", 1.0, "nudge"),
    ("mse", "random", "pgd", "sync", 0.5, "nudge"),
    ("ce", "forward", "mod-pgd", "async", 0.7, "clamp"),
]


@pytest.mark.parametrize("cost, scheme, rule, order, alpha, perturbation", SETTINGS)
def test_vgg5_from_generic_layers_gives_the_fast_paths_estimate(cost, scheme, rule, order, alpha,
                                                                 perturbation):
    """Same network, same signs: the VJP path and the closed form agree to rounding, for each
    rule, order, α, scheme, perturbation and cost. A max-pool inside g_k routes through the
    current winner: the built-in layers' ``pool_routing="nudged"``."""
    torch.manual_seed(0)
    fast = VGG5(3, 10, 16, width_mult=1 / 32).double()
    slow = as_generic(fast)
    x, y = batch((3, 3, 16, 16), 10)
    torch.testing.assert_close(slow(x), fast(x), rtol=1e-12, atol=1e-12)
    ep = ep_estimator(cost, scheme, beta=1e-3, K=fast.depth, rule=rule, order=order, alpha=alpha,
                      perturbation=perturbation, pool_routing="nudged",
                      generator=torch.Generator().manual_seed(0))
    betas = ep.signed_betas(3, x.device)
    want, got = ep.estimate(fast, x, y, betas), ep.estimate(slow, x, y, betas)
    g_fast = torch.autograd.grad(want.surrogate, list(fast.parameters()))
    g_slow = torch.autograd.grad(got.surrogate, list(slow.parameters()))
    for a, b in zip(g_slow, g_fast):
        assert ((a - b).norm() / b.norm()).item() < 1e-9
    for key in want.stats:
        torch.testing.assert_close(got.stats[key], want.stats[key], rtol=1e-9, atol=1e-12)


class Join(nn.Module):
    """g(h, s) = conv3x3(h) + conv1x1_stride2(s): a layer reading two states."""

    def __init__(self, channels: int, skip_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.Conv2d(skip_channels, channels, 1, stride=2)

    def forward(self, h, s):
        return self.conv(h) + self.skip(s)


def mixed() -> PCN:
    """Built-in conv → generic 5×5 conv + average pool (no closed form) → built-in conv →
    generic join of h_3 and a skip from h_1 → built-in dense output."""
    return PCN([PCNLayer("conv", 3, 4),
                GenericLayer(nn.Sequential(nn.Conv2d(4, 6, 5, padding=2), nn.AvgPool2d(2))),
                PCNLayer("conv", 6, 8),
                GenericLayer(Join(8, 4)),
                PCNLayer("dense", 8 * 4 * 4, 10, relu=False)], skips={4: 1})


@pytest.mark.parametrize("cost", ["ce", "mse"])
def test_mixed_generic_and_builtin_layers_with_a_skip_match_backprop(cost):
    """Float64, centered, β = 1e-3 (1e-6 where a draw crosses a kink): every tensor within 1e-4."""
    for seed in range(3):
        torch.manual_seed(seed)
        net = mixed().double()
        x, y = batch((4, 3, 8, 8), 10, seed=seed)
        cos, rel, kinks = compare(net, x, y, ep_estimator(cost, K=net.depth, beta=1e-3))
        if kinks:
            cos, rel, _ = compare(net, x, y, ep_estimator(cost, K=net.depth, beta=1e-6))
        assert max(rel) <= 1e-4 and min(cos) >= 0.99999, (seed, kinks, rel)


def test_a_generic_layer_reads_its_skip_sources_in_order():
    net = mixed()
    assert net.sources(4) == [3, 1] and net.readers(1) == [2, 4]
    with pytest.raises(ValueError, match="invalid skip"):  # a built-in layer takes one source
        PCN([PCNLayer("conv", 3, 4), PCNLayer("conv", 4, 4), PCNLayer("conv", 4, 4, skip_in=4),
             PCNLayer("dense", 4 * 64, 10, relu=False)], skips={3: (0, 1)})
    with pytest.raises(ValueError, match="invalid skip"):  # from a later state
        PCN([GenericLayer(nn.Identity()), GenericLayer(nn.Identity(), relu=False)], skips={2: 2})


def test_bench_times_the_generic_twin_beside_the_closed_form(capsys):
    """``bench --generic``: the VJP path's EP step beside the closed form's, in one run."""
    import json

    from pcn_ep.tools import bench

    args = ["--width-mult", "0.0625", "--input-size", "16", "--batch-size", "2", "--steps", "1",
            "--K", "3", "--generic"]
    assert bench.main(args) == 0
    assert "EP with generic layers (the same network from plain modules, VJPs)" in capsys.readouterr().out
    assert bench.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generic_ratio"] == report["ep_generic_step_s"] / report["ep_step_s"]


def test_as_generic_refuses_what_it_cannot_rebuild():
    from pcn_ep.core import VGG10Skip

    with pytest.raises(ValueError, match="has skips or generic layers"):
        as_generic(VGG10Skip(in_channels=1, num_classes=3, input_size=32, width_mult=1 / 64))


def test_gradcheck_and_bench_take_the_users_own_network(tmp_path, monkeypatch, capsys):
    """``--network module.Class --init-args JSON``: a network of the user's own file, checked
    against backprop (float64 passes) and timed; a wrong name is one error line."""
    from pcn_ep.tools import bench, gradcheck

    (tmp_path / "my_net.py").write_text(
        "from torch import nn\n"
        "from pcn_ep.core import PCN, GenericLayer\n\n\n"
        "class Small(PCN):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__([\n"
        "            GenericLayer(nn.Sequential(nn.Conv2d(1, width, 5, padding=2), nn.AvgPool2d(2))),\n"
        "            GenericLayer(nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 3)), relu=False)])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    shape = ["--in-channels", "1", "--input-size", "8", "--num-classes", "3"]
    assert gradcheck.main(["--network", "my_net.Small", "--init-args", '{"width": 3}', *shape]) == 0
    assert capsys.readouterr().out.startswith("Small, centered nudge")
    assert bench.main(["--network", "my_net.Small", *shape, "--steps", "1", "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.startswith("my_net.Small (3 classes), input 1×8×8")
    for bad, says in ((["--network", "my_net.Nope"], "cannot import it"),
                      (["--network", "json.JSONDecoder"], "not a pcn_ep.core.PCN subclass"),
                      (["--network", "my_net.Small", "--init-args", "[1]"], "JSON object"),
                      (["--network", "my_net.Small", "--init-args", '{"depth": 2}'], "depth")):
        assert gradcheck.main([*bad, *shape]) == 2
        assert says in capsys.readouterr().err

"""Max-pool routing in the nudged phase: ``nudged`` (the max recomputed) or ``free`` (the free
phase's winners kept, as backprop's derivative does), on random and on exactly tied inputs."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import batch, ep_estimator
from pcn_ep.core import (VGG5, VGG10Skip, Dynamics, get_cost, gradient_fidelity, nudged_phase)
from pcn_ep.tools.gradcheck import main as gradcheck


def mnist_like(n=2):
    """Real digits, nearest-upsampled to 24×24 and zero-padded to 32×32 like MNIST, normalized
    with MNIST's statistics: a flat background that ties max-pool windows exactly."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float64).unsqueeze(1) / 16
    x = F.pad(F.interpolate(x, size=24, mode="nearest"), (4, 4, 4, 4))
    return (x - 0.1307) / 0.3081, torch.tensor(digits.target[:n])


def tied_setup():
    torch.manual_seed(0)
    return VGG5(1, 10, 32, width_mult=0.125).double(), *mnist_like()


def test_free_routing_matches_backprop_on_a_tied_input():
    """Float64, β = 1e-6: free routing ≤ 1e-6 relative error per tensor; nudged routing stays
    ~1e-2 off, because the tied windows of layer 2 re-route with the sign of β."""
    net, x, y = tied_setup()
    free = gradient_fidelity(net, ep_estimator(beta=1e-6, K=5, pool_routing="free"), x, y)
    nudged = gradient_fidelity(net, ep_estimator(beta=1e-6, K=5, pool_routing="nudged"), x, y)
    assert free["layers"][1]["ties"] > 100  # layer 2 (its input moves) has tied windows
    assert free["max_rel_err"] <= 1e-6 and free["kink_crossings"] == 0, free["tensors"]
    assert nudged["max_rel_err"] > 1e-3 and nudged["layers"][1]["kinks"] > 0


@pytest.mark.parametrize("routing", ["nudged", "free"])
def test_both_routings_pass_gradcheck_on_random_inputs(routing, capsys):
    args = ["--batch-size", "2", "--beta", "1e-6", "--pool-routing", routing, "--json",
            "--min-cosine", "0.99999", "--max-rel-err", "1e-6"]
    for model in (["--model", "vgg5"], ["--model", "vgg10skip", "--width-mult", "0.0625"]):
        assert gradcheck(args + model) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["verdict"] == "pass" and report["pool_ties"] == 0


def test_free_routing_keeps_the_free_winners_where_nudged_routing_moves_them():
    """A large nudge moves some windows' argmax under nudged routing; free routing keeps every
    pooled layer's routing equal to the free phase's. Where no winner moves (a small nudge, no
    ties) the two are the same map: bitwise equal estimates."""
    torch.manual_seed(0)
    net = VGG10Skip(3, 10, input_size=32, width_mult=0.0625).double()
    x, y = batch((2, 3, 32, 32), 10)
    betas = torch.tensor([3.0, 3.0, -3.0, -3.0], dtype=torch.float64)
    pooled = [k for k in range(2, net.depth + 1) if net.layers[k - 1].pool]
    moved = {}
    for routing in ("nudged", "free"):
        with torch.no_grad():
            state = nudged_phase(net, net.free_phase(x), y, betas, get_cost("ce"), Dynamics(10),
                                 pool_routing=routing)
            moved[routing] = [not torch.equal(state.indices[k], state.free_indices(k))
                              for k in pooled]
    assert any(moved["nudged"]) and not any(moved["free"])
    params = list(net.parameters())
    small = [torch.autograd.grad(ep_estimator(beta=1e-4, K=10, pool_routing=routing)(net, x, y)
                                 .surrogate, params) for routing in ("nudged", "free")]
    assert all(torch.equal(a, b) for a, b in zip(*small))


def test_free_routing_is_bitwise_deterministic_and_rejects_unknown_names():
    net, x, y = tied_setup()
    params = list(net.parameters())
    grads = [torch.autograd.grad(ep_estimator(beta=0.05, K=5, pool_routing="free")(net, x, y)
                                 .surrogate, params) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="pool_routing 'winner'"):
        ep_estimator(pool_routing="winner")


def test_training_module_takes_the_routing_and_warns_on_resuming_another(capsys):
    """The module passes ``pool_routing`` to EP, refuses unknown names in one line, and a resumed
    checkpoint from before the option (nudged routing then) gets the settings-changed warning."""
    from types import SimpleNamespace

    from pcn_ep.core import MLP
    from pcn_ep.training.module import PCNEPModule

    assert PCNEPModule(MLP(6, 3, hidden=(8,))).estimator.pool_routing == "free"
    module = PCNEPModule(MLP(6, 3, hidden=(8,)), pool_routing="nudged")
    assert module.estimator.pool_routing == "nudged"
    with pytest.raises(ValueError, match="model.pool_routing must be 'nudged' .* got 'winner'"):
        PCNEPModule(MLP(6, 3, hidden=(8,)), pool_routing="winner")
    module = PCNEPModule(MLP(6, 3, hidden=(8,)))
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), global_rank=0)
    module._check_resume({"algorithm": "ep", "beta": 0.05})
    assert "pool_routing 'nudged' -> 'free'" in capsys.readouterr().err


def test_gradcheck_on_real_images_reports_ties_and_needs_a_root(tmp_path, capsys):
    """``--data mnist``: the network takes the data's channels and classes, the padded digits tie
    windows in the free state, and free routing still matches backprop at β = 1e-6."""
    from images import mnist

    root = mnist(tmp_path)
    assert gradcheck(["--data", "mnist", "--data-root", str(root), "--batch-size", "4",
                      "--beta", "1e-6", "--max-rel-err", "1e-6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pool_ties"] > 0 and report["tensors"][0]["name"] == "layers.0.weight"
    assert gradcheck(["--data", "mnist"]) == 2
    assert capsys.readouterr().err == ("pcn_ep: error: --data mnist needs --data-root (the data "
                                       "set's folder)\n")

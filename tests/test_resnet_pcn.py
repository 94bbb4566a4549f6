"""ResNetPCN: EP equals backprop of the training forward (BatchNorm, GroupNorm, LayerNorm, none)."""
import copy

import pytest
import torch

from helpers import batch, compare, ep_estimator
from pcn_ep.core import Backprop, ResNetPCN
from pcn_ep.tools import gradcheck


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_gradcheck_passes_on_resnet18(norm, capsys):
    """ResNet-18's layout at 1/16 width, 16×16 inputs, float64, centered, K = L = 10. At β = 1e-3
    these draws move 1 to 26 units across a ReLU kink (a finite-β effect, gradcheck counts them),
    so β = 1e-6: every tensor within 1e-4 of backprop (seen: 2.9e-7, 1.4e-5, 9.1e-9)."""
    code = gradcheck.main(["--model", "resnet18", "--norm", norm, "--width-mult", "0.0625",
                           "--input-size", "16", "--beta", "1e-6", "--max-rel-err", "1e-4",
                           "--min-cosine", "0.99999"])
    out = capsys.readouterr().out
    assert code == 0 and "ResNetPCN" in out and "verdict: PASS" in out, out


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "none"])
def test_small_resnet_matches_backprop_at_beta_1e_3(norm):
    """Two stages of one block: at β = 1e-3 every draw that crosses no counted kink matches
    (there must be one); every draw matches at β = 1e-6."""
    smooth = 0
    for seed in range(3):
        torch.manual_seed(seed)
        net = ResNetPCN(3, 10, 8, width_mult=1 / 16, blocks=(1, 1), norm=norm).double()
        x, y = batch((4, 3, 8, 8), 10, seed=seed)
        cos, rel, kinks = compare(net, x, y, ep_estimator("ce", K=net.depth, beta=1e-3))
        if kinks == 0:
            smooth += 1
            assert max(rel) <= 1e-4 and min(cos) >= 0.99999, (seed, rel)
        cos, rel, _ = compare(net, x, y, ep_estimator("ce", K=net.depth, beta=1e-6))
        assert max(rel) <= 1e-4 and min(cos) >= 0.99999, (seed, rel)
    assert smooth >= 1


def _buffers(net):
    return {name: b.clone() for name, b in net.named_buffers()}


def test_batchnorm_running_statistics_move_once_per_step_as_in_a_training_forward():
    """The free phase is the training forward: it updates the running statistics once; the nudged
    phase and the weight gradients leave them alone. In eval mode EP matches backprop through the
    running statistics and updates nothing."""
    torch.manual_seed(0)
    net = ResNetPCN(3, 10, 8, width_mult=1 / 16, blocks=(1, 1)).double()
    twin = copy.deepcopy(net)
    x, y = batch((4, 3, 8, 8), 10)
    twin(x)  # one training forward
    ep_estimator("ce", K=net.depth, beta=1e-3)(net, x, y)
    want, got = _buffers(twin), _buffers(net)
    assert want.keys() == got.keys() and any("running_mean" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)

    net.eval()
    before = _buffers(net)
    _, rel, _ = compare(net, x, y, ep_estimator("ce", K=net.depth, beta=1e-6))
    assert max(rel) <= 1e-4, rel
    for name, b in _buffers(net).items():
        assert torch.equal(b, before[name]), name


def test_each_nudged_copy_has_its_own_batch_statistics():
    """Centered EP's +β and −β copies are two systems: pooling their statistics would make each
    nudge the other, and the estimate would no longer be backprop's gradient (the estimate with
    the copies run apart matches; with one pooled batch it does not)."""
    torch.manual_seed(1)
    net = ResNetPCN(3, 10, 8, width_mult=1 / 16, blocks=(1,)).double()
    x, y = batch((4, 3, 8, 8), 10, seed=1)
    _, rel, _ = compare(net, x, y, ep_estimator("ce", K=net.depth, beta=1e-6))
    assert max(rel) <= 1e-4, rel
    for layer in net.layers:
        layer.batch_coupled = False  # run both copies as one batch
    _, rel, _ = compare(net, x, y, ep_estimator("ce", K=net.depth, beta=1e-6))
    assert max(rel) > 1e-2, rel


def test_resnet18_layout():
    net = ResNetPCN(3, 100, 32, width_mult=0.25)
    assert net.depth == 10 and net.layers[-1].weight.shape == (100, 128)
    assert net.layers[0].weight.shape == (16, 3, 3, 3)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    stem = ResNetPCN(3, 10, 64, width_mult=0.125, stem="imagenet", norm="group")
    assert stem.layers[0].weight.shape == (8, 3, 7, 7)
    assert stem.free_phase(torch.zeros(2, 3, 64, 64)).a[1].shape == (2, 8, 16, 16)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())
    with pytest.raises(ValueError, match="norm must be one of"):
        ResNetPCN(norm="instance")
    assert Backprop()(net, torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).loss > 0


def test_bench_times_resnet18(capsys):
    """``bench`` counts FLOPs with FlopCounterMode, whose module hooks once broke inside the
    generic layers' VJPs (leaf inputs inside ``autograd.grad``)."""
    from pcn_ep.tools import bench

    code = bench.main(["--model", "resnet18", "--norm", "batch", "--width-mult", "0.0625",
                       "--input-size", "8", "--batch-size", "4", "--steps", "1", "--K", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "RESNET18 (width ×0.0625, batch norm" in out and "EP/BP" in out, out

"""Minimum-work equilibration (FLOP counts), bf16 fidelity, and the bench command's report."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import batch, ep_estimator
from pcn_ep.tools.bench import main as bench
from pcn_ep.tools.bench import step_flops
from pcn_ep.core import VGG5, VGG10, Backprop


@pytest.mark.parametrize("scheme, bound", [("centered", 11.0), ("random", 5.8)])
def test_vgg10_224_flop_ratio_to_backprop(scheme, bound):
    """Cost model: caching + wavefront skipping give about 10.5 (centered) and 5.4 (random)."""
    torch.manual_seed(0)
    net = VGG10(num_classes=1000)
    x, y = torch.randn(1, 3, 224, 224), torch.tensor([3])
    ratio = step_flops(net, ep_estimator(scheme=scheme, beta=0.05, K=10), x, y) / step_flops(
        net, Backprop(), x, y)
    assert 4 < ratio <= bound, ratio


def test_bf16_autocast_keeps_ep_faithful():
    torch.manual_seed(0)
    net = VGG5(3, 10, 32, width_mult=0.25)
    x, y = batch((32, 3, 32, 32), 10, dtype=torch.float32)
    params = list(net.parameters())
    g_bp = torch.autograd.grad(Backprop()(net, x, y).surrogate, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        estimate = ep_estimator(beta=0.05, K=6)(net, x, y)
    g_ep = torch.autograd.grad(estimate.surrogate, params)
    cos = [F.cosine_similarity(a.flatten().float(), b.flatten(), dim=0).item()
           for a, b in zip(g_ep, g_bp)]
    assert min(cos) >= 0.98, cos


def test_bench_reports_side_by_side(capsys):
    assert bench(["--model", "vgg5", "--width-mult", "0.125", "--input-size", "16",
                  "--batch-size", "4", "--K", "3", "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"ep_step_s", "bp_step_s", "time_ratio", "ep_flops", "bp_flops", "flop_ratio",
            "images_per_s", "mfu", "device"} == report.keys()
    assert report["flop_ratio"] == pytest.approx(report["ep_flops"] / report["bp_flops"])
    assert report["flop_ratio"] > 1 and report["mfu"] is None and report["device"] == "cpu"
    assert bench(["--device", "cuda"] if not torch.cuda.is_available() else ["--K", "0"]) == 2

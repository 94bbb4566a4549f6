"""Minimum-work equilibration (FLOP counts), bf16 fidelity, and the bench command's report."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import batch, ep_estimator
from pcn_ep.tools.bench import main as bench
from pcn_ep.tools.bench import estimator, parser, step_flops
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
            "ep_kernels", "bp_kernels", "images_per_s", "mfu", "device"} == report.keys()
    assert report["flop_ratio"] == pytest.approx(report["ep_flops"] / report["bp_flops"])
    assert report["flop_ratio"] > 1 and report["mfu"] is None and report["device"] == "cpu"
    assert report["ep_kernels"] > report["bp_kernels"] > 0
    if not torch.cuda.is_available():
        assert bench(["--device", "cuda"]) == 2
    with pytest.raises(SystemExit):  # a bad value is refused while the flags are read
        bench(["--K", "0"])


def test_bench_times_the_pool_routing_asked_for():
    assert estimator(parser().parse_args([]), "centered").pool_routing == "free"
    assert estimator(parser().parse_args(["--pool-routing", "nudged"]), "random").pool_routing == \
        "nudged"


def test_bench_memory_reports_bytes_per_example(capsys):
    assert bench(["--memory", "--model", "vgg5", "--width-mult", "0.125", "--batch-sizes", "16",
                  "128", "--at", "1024", "--K", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for method in ("bp", "centered", "random"):
        r = report[method]
        # the report's arithmetic; the sizes themselves are a benchmark's business (a tiny net's
        # resident set can round to the same pages at both batches on a noisy machine)
        assert len(r["peak_bytes"]) == 2 and min(r["peak_bytes"]) > 0 and r["bytes_per_example"] >= 0
        assert r["bytes_per_example"] == (r["peak_bytes"][1] - r["peak_bytes"][0]) / (128 - 16)
        assert r["projected_peak_bytes"] >= max(r["peak_bytes"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_gpu_suite_refuses_in_one_line_without_a_gpu(capsys):
    assert bench(["--suite", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err

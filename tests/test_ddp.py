"""DDP with 2 CPU processes (gloo): data coverage for both ImageNet backends, and the EP gradient
after the all-reduce against the single-process gradient on both ranks' batches together."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from images import image_folder
from pcn_ep.core import MLP, Dynamics, EquilibriumPropagation
from pcn_ep.data.write_ffcv import write_ffcv

WORKER = Path(__file__).with_name("ddp_worker.py")


def launch(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def unique_images(tmp_path_factory):
    """24 images, each its own class, so a label identifies an example."""
    root = tmp_path_factory.mktemp("ddp")
    image_folder(root / "train", classes=24, per_class=1)
    write_ffcv(root / "train", root / "train.beton", max_resolution=64, workers=1)
    return root


@pytest.mark.parametrize("backend", ["ffcv", "folder"])
def test_every_training_example_is_seen_once_across_ranks(unique_images, tmp_path, backend):
    path = unique_images / ("train.beton" if backend == "ffcv" else "train")
    launch("coverage", tmp_path, backend, path, cwd=tmp_path)
    seen = [torch.load(tmp_path / f"seen_rank{r}.pt") for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 12  # 24 examples split evenly: no padding needed
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_ddp_ep_gradient_equals_single_process_gradient(tmp_path):
    launch("gradient", tmp_path, cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"grads_rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(0)  # the worker's seed_everything(0) before building the same network
    net = MLP(12, 3, hidden=(16,)).double()
    x = torch.cat([r["x"] for r in ranks])
    y = torch.cat([r["y"] for r in ranks])
    ep = EquilibriumPropagation("ce", "nudge", "centered", 0.01, Dynamics(3))
    single = torch.autograd.grad(ep(net, x, y).surrogate, list(net.parameters()))
    assert not torch.equal(ranks[0]["x"], ranks[1]["x"])
    for g_rank0, g_rank1, g in zip(ranks[0]["grads"], ranks[1]["grads"], single):
        assert torch.equal(g_rank0, g_rank1)
        assert ((g_rank0 - g).norm() / g.norm()).item() <= 1e-5

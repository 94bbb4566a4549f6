"""The FFCV backend resumes at the same position of the same order: a loader rebuilt from a saved
state yields the rest of the interrupted epoch's batches, then the next epochs' orders, as the
loader that was never stopped does (each rank its own shard under DDP). FFCV's random crops and
flips are not seeded, so these tests compare the examples (one class per image: a label names its
example), not weights. Each new FFCV loader spends seconds in numba JIT: the tests keep them few."""
import gc
import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from images import image_folder
from pcn_ep.data import ImageNetDataModule
from pcn_ep.data.base import finish_epoch
from pcn_ep.data.write_ffcv import write_ffcv

N = 22  # images, each its own class; with batches of 4 the last batch of an epoch is partial


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv_resume")
    image_folder(root / "train", classes=N, per_class=1, size=24)
    write_ffcv(root / "train", root / "train.beton", max_resolution=32, workers=1)
    return root / "train.beton"


def train_loader(beton, drop_last=False):
    data = ImageNetDataModule(str(beton), str(beton), num_classes=N, image_size=16, val_resize=18,
                              batch_size=4, num_workers=1, drop_last=drop_last, seed=3)
    data.setup()
    return data.train_dataloader()


def run_epoch(loader, epoch, batches=None):
    """The labels of the first ``batches`` batches of ``epoch``, called as Lightning does: iter()
    first, then set_epoch, then the batches."""
    iterator = iter(loader)
    loader.sampler.set_epoch(epoch)
    labels = [batch[1].tolist() for batch in itertools.islice(iterator, batches)]
    iterator.close()  # FFCV's reading thread ends here, not in some later garbage collection
    return labels


@pytest.fixture(autouse=True)
def collect_loaders():
    """Dead FFCV loaders are collected here (their numba finalizers print harmless errors)."""
    yield
    gc.collect()


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_rebuilt_loader_continues_the_order_where_the_saved_one_stopped(beton, drop_last):
    whole = train_loader(beton, drop_last)
    epochs = [run_epoch(whole, e) for e in range(3)]
    assert len(epochs[0]) == len(whole) == (5 if drop_last else 6)
    assert len(set(sum(epochs[0], []))) == (20 if drop_last else N)  # each example once
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    for k in (3, len(epochs[0])):  # mid-epoch, and after the epoch's last batch
        stopped = train_loader(beton, drop_last)
        run_epoch(stopped, 0)  # an epoch before the one it stops in
        assert run_epoch(stopped, 1, k) == epochs[1][:k]
        state = stopped.state_dict()
        assert state == {"sampler": "EpochShuffle", "epoch": 1,
                         "yielded": sum(map(len, epochs[1][:k]))}
        resumed = train_loader(beton, drop_last)
        resumed.load_state_dict(state)
        assert len(resumed) == len(whole)  # Lightning counts the resumed epoch from the position
        assert run_epoch(resumed, 1) == epochs[1][k:]
        assert run_epoch(resumed, 2) == epochs[2]
    # a checkpoint saved after the epoch's last step (PCNEPModule calls finish_epoch on it)
    finish_epoch(state)
    assert state == {"sampler": "EpochShuffle", "epoch": 2, "yielded": 0}
    resumed = train_loader(beton, drop_last)
    resumed.load_state_dict(state)
    assert run_epoch(resumed, 2) == epochs[2]


def rank_loader(beton, monkeypatch, rank, **kw):
    """The training loader of ``rank`` of 2 (FFCV's distributed order asks torch.distributed)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: rank)
    data = ImageNetDataModule(str(beton), str(beton), num_classes=N, image_size=16, val_resize=18,
                              num_workers=1, **kw)
    data.trainer = SimpleNamespace(world_size=2)  # the module builds distributed loaders
    data.setup()
    return data.train_dataloader()


def test_each_rank_resumes_its_own_shard(beton, monkeypatch):
    """After 2 batches, rank 0's saved position resumes each rank at the rest of its own shard."""
    ranks = [rank_loader(beton, monkeypatch, rank, batch_size=4, drop_last=False)
             for rank in (0, 1)]
    whole = [run_epoch(loader, 1) for loader in ranks]
    assert sorted(sum(whole[0] + whole[1], [])) == list(range(N))  # 11 each, no padding
    heads = [run_epoch(loader, 1, 2) for loader in ranks]
    state = ranks[0].state_dict()
    assert heads == [w[:2] for w in whole] and state["yielded"] == 8
    for rank in (0, 1):
        resumed = rank_loader(beton, monkeypatch, rank, batch_size=4, drop_last=False)
        resumed.load_state_dict(state)
        assert run_epoch(resumed, 1) == whole[rank][2:]


# -- through Lightning: a fit stopped by a signal after a known step, resumed with --ckpt_path last

class Labels(Callback):
    """Appends each training step's labels to ``folder``/labels_rank{R}.jsonl."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.folder / f"labels_rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                   "labels": batch[1].tolist()}) + "\n")


def fit_config(folder, beton, signal_step=None, ddp=False):
    """configs/imagefolder.yaml on the .beton (FFCV backend), a narrow VGG5 at 16×16; 3 epochs of 5
    steps (batches of 4, the last 2 examples dropped); under DDP 2 epochs of 3 steps per rank."""
    from test_usability import CONFIGS

    cfg = yaml.safe_load((CONFIGS / "imagefolder.yaml").read_text())
    cfg["data"] = {"class_path": "pcn_ep.data.ImageNetDataModule", "init_args": {
        "train_path": str(beton), "val_path": str(beton), "backend": "ffcv", "num_classes": N,
        "image_size": 16, "val_resize": 18, "batch_size": 3 if ddp else 4, "num_workers": 1,
        "seed": 0}}
    cfg["model"]["network"]["init_args"]["width_mult"] = 0.0625
    cfg["model"].update(t_max=3, K=2)
    cfg["trainer"].update(max_epochs=2 if ddp else 3, default_root_dir=str(folder), logger=False,
                          enable_progress_bar=False)
    if ddp:
        cfg["trainer"].update(strategy="ddp", devices=2, accelerator="cpu")
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": str(folder / "checkpoints"), "monitor": "val/top1_error", "mode": "min",
            "save_last": False, "enable_version_counter": False}},
        {"class_path": "test_ffcv_resume.Labels", "init_args": {"folder": str(folder)}}]
    if signal_step is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "signal_at.SignalAt", "init_args": {
            "signal": "SIGTERM", "at": "train", "step": signal_step}})
    cfg["test_after_fit"] = False
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def steps(folder, rank=0):
    lines = (folder / f"labels_rank{rank}.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["labels"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def whole_fit(beton, tmp_path_factory):
    from pcn_ep.training.cli import main

    folder = tmp_path_factory.mktemp("whole")
    assert main(["fit", "--config", str(fit_config(folder, beton))]) == 0
    return steps(folder)


@pytest.mark.parametrize("step", [2, 4, 7])  # mid-epoch 0; the last step of epoch 0; mid-epoch 1
def test_a_stopped_ffcv_fit_resumes_with_the_same_examples(beton, whole_fit, tmp_path, capsys,
                                                          step):
    from pcn_ep.training.cli import main

    assert [s for _, s, _ in whole_fit] == list(range(15))
    assert main(["fit", "--config", str(fit_config(tmp_path, beton, step))]) == 143, \
        capsys.readouterr().err
    assert len(steps(tmp_path)) == step + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(fit_config(tmp_path, beton)), "--ckpt_path",
                     "last"]) == 0
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert steps(tmp_path) == whole_fit


def test_a_stopped_ddp_ffcv_fit_resumes_each_rank_at_its_shard_position(beton, tmp_path,
                                                                        monkeypatch):
    """2 gloo processes, SIGTERM to both in step 4 (mid-epoch 1), resumed: each rank has seen,
    step by step, its shard of FFCV's order of each epoch (the loader the module builds for it)."""
    here = Path(__file__).resolve().parent  # this checkout's pcn_ep, whichever one is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}

    def fit(*extra, signal_step=None):
        path = fit_config(tmp_path, beton, signal_step, ddp=True)
        return subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--config", str(path),
                               *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)

    stopped = fit(signal_step=4)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert [len(steps(tmp_path, rank)) for rank in (0, 1)] == [5, 5]
    resumed = fit("--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    for rank in (0, 1):
        loader = rank_loader(beton, monkeypatch, rank, batch_size=3, seed=0)
        expected = [(e, 3 * e + i, labels) for e in (0, 1)
                    for i, labels in enumerate(run_epoch(loader, e))]
        assert steps(tmp_path, rank) == expected
    epoch_1 = [{label for e, _, labels in steps(tmp_path, rank) if e == 1 for label in labels}
               for rank in (0, 1)]
    assert len(epoch_1[0]) == len(epoch_1[1]) == 9 and not epoch_1[0] & epoch_1[1]  # own shards

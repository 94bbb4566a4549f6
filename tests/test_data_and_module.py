"""Digits data module, optimizer and schedule, packaging of the embedded default."""
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from pcn_ep.training.cli import DEFAULT_CONFIG, main
from pcn_ep.core import MLP
from pcn_ep.data import DigitsDataModule, EpochShuffle
from pcn_ep.training.module import PCNEPModule

ROOT = Path(__file__).resolve().parents[1]


def test_digits_split_is_fixed_disjoint_and_normalized():
    a, b = DigitsDataModule(image_size=16, seed=0), DigitsDataModule(image_size=16, seed=0)
    a.setup(), b.setup()
    sizes = {k: len(v[1]) for k, v in a.splits.items()}
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    assert all(torch.equal(a.splits[k][0], b.splits[k][0]) for k in sizes)
    x_train = a.splits["train"][0]
    assert x_train.shape[1:] == (1, 16, 16)
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-3
    rows = {k: {tuple(r.tolist()) for r in v[0].flatten(1)} for k, v in a.splits.items()}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert set(a.splits["test"][1].tolist()) == set(range(10))
    c = DigitsDataModule(seed=1)
    c.setup()
    assert not torch.equal(c.splits["test"][0], a.splits["test"][0])


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    s = EpochShuffle(50, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    s.set_epoch(0)
    assert list(s) == first != second and sorted(first) == list(range(50))


def _train(tmp_path, **hparams):
    torch.manual_seed(0)
    data = DigitsDataModule(image_size=8, flatten=True, batch_size=64)
    module = PCNEPModule(MLP(64, 10, hidden=(32,)), K=2, **hparams)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module, trainer


def test_per_step_cosine_reaches_eta_min_and_layer_lrs_make_groups(tmp_path):
    module, trainer = _train(tmp_path, lr=0.1, eta_min=1e-3, schedule_interval="step",
                             layer_lrs=[0.1, 0.05])
    optimizer = trainer.optimizers[0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3], abs=1e-9)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 10


def test_per_epoch_cosine_follows_the_paper_schedule(tmp_path):
    module, trainer = _train(tmp_path, lr=0.1, eta_min=0.0, t_max=4)
    lr = trainer.optimizers[0].param_groups[0]["lr"]  # after epoch 1 started: one step of 4
    assert lr == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_the_configs_ship_and_work_from_any_folder_after_a_plain_install(tmp_path):
    """A wheel installed (not editable) into its own folder, run from an empty folder: the
    docs' ``--config configs/NAME.yaml`` finds the shipped config, says which file it used, and
    the data root stays relative to the caller (the finding: only quickstart.yaml shipped, and
    ``configs/imagefolder.yaml`` did not exist outside a checkout)."""
    from images import image_folder

    assert DEFAULT_CONFIG.is_file()
    src = tmp_path / "src"  # build a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(ROOT / "pcn_ep", src / "pcn_ep", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, timeout=300)
    wheel = next(tmp_path.glob("pcn_ep-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("pcn_ep/configs/")}
    assert shipped == {f"pcn_ep/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    site, here = tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    here.mkdir()
    for split in ("train", "val"):
        image_folder(here / "my_images" / split, classes=2, per_class=2)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}

    def pcn_ep(*args):
        return subprocess.run([sys.executable, "-m", "pcn_ep", *args], cwd=here, env=env,
                              capture_output=True, text=True, timeout=600)

    where = pcn_ep("fit", "--config", "configs/vgg10.yaml", "--print_config")
    assert where.returncode == 0 and "class_path: pcn_ep.core.VGG10" in where.stdout, where.stderr
    assert f"using the shipped {site / 'pcn_ep' / 'configs' / 'vgg10.yaml'}" in where.stderr
    fit = pcn_ep("fit", "--config", "configs/imagefolder.yaml", "--data.init_args.root", "my_images",
                 "--trainer.max_epochs", "1", "--data.init_args.image_size", "16",
                 "--data.init_args.num_workers", "0", "--model.network.init_args.width_mult",
                 "0.0625", "--trainer.accelerator", "cpu")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert (here / "runs" / "imagefolder" / "seed0" / "checkpoints" / "last.ckpt").is_file()
    nothing = pcn_ep("fit", "--config", "configs/vgg11.yaml")
    assert nothing.returncode == 1 and "vgg10, vgg10_bp" in nothing.stderr, nothing.stderr


def test_print_config_resolves_the_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--print_config"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "pcn_ep.core.VGG5" in out and "centered" in out


def test_quickstart_configs_differ_only_in_algorithm_and_paths():
    import yaml

    ep = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    bp = yaml.safe_load((ROOT / "configs" / "quickstart_bp.yaml").read_text())
    assert ep["model"] | {"algorithm": "bp"} == bp["model"] and ep["data"] == bp["data"]
    assert ep["trainer"]["max_epochs"] == bp["trainer"]["max_epochs"]

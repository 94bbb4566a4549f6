"""A run stopped after any step and resumed with ``--ckpt_path last`` ends bitwise where the run
that was never stopped ends: weights, optimizer, sign generators, steps. The signal comes from the
run itself (``signal_at.SignalAt``) so each case stops where it says."""
import warnings

import pytest
import torch
import yaml

from pcn_ep.training.cli import main
from test_training import tiny_config


def config(folder, signal=None, at="train", step=0):
    """3 epochs of 8 batches of digits, the random scheme (its signs must resume too)."""
    path, cfg = tiny_config(folder, scheme="random", t_max=3)
    cfg["trainer"].update(max_epochs=3)
    if signal:
        cfg["trainer"]["callbacks"].append({"class_path": "signal_at.SignalAt", "init_args": {
            "signal": signal, "at": at, "step": step}})
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_state(folder):
    saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    return saved["global_step"], saved["state_dict"], saved["optimizer_states"], saved["sign_generators"]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unstopped")
    assert main(["fit", "--config", str(config(folder))]) == 0
    return final_state(folder)


@pytest.mark.parametrize("signal, at, step, saved_step", [
    ("SIGTERM", "train", 3, 4),           # mid-epoch: the step ends, then the save
    ("SIGUSR1", "train", 7, 8),           # the epoch's last step, before its validation
    ("SIGINT", "fit_validation", 0, 9),   # epoch 0's validation ends, one more step, then the save
    ("SIGTERM", "train", 12, 13),         # mid-epoch of a later epoch
])
def test_a_run_stopped_after_any_step_resumes_bitwise(tmp_path, capsys, unstopped, signal, at,
                                                      step, saved_step):
    code = main(["fit", "--config", str(config(tmp_path, signal, at, step))])
    assert code in (130, 143), capsys.readouterr().err
    assert final_state(tmp_path)[0] == saved_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(config(tmp_path)), "--ckpt_path", "last"]) == 0
    assert not [w for w in caught if "not resumable" in str(w.message)]
    resumed = final_state(tmp_path)
    assert resumed[0] == unstopped[0] == 24
    assert same(resumed, unstopped)


def imagefolder_config(folder, root, signal=None, step=0):
    """configs/imagefolder.yaml on 36 small real images of 3 classes, 2 decoding workers,
    3 epochs of 6 batches of 6 (the random resized crops and flips are drawn in the workers)."""
    from images import image_folder
    from test_usability import CONFIGS

    if not root.exists():
        for split, count in (("train", 12), ("val", 2)):
            image_folder(root / split, classes=3, per_class=count, size=24)
    cfg = yaml.safe_load((CONFIGS / "imagefolder.yaml").read_text())
    cfg["data"]["init_args"].update(root=str(root), image_size=16, batch_size=6, num_workers=2)
    cfg["model"]["network"]["init_args"]["width_mult"] = 0.0625
    cfg["model"]["t_max"] = 3
    cfg["trainer"].update(max_epochs=3, default_root_dir=str(folder), enable_progress_bar=False)
    cfg["trainer"]["logger"] = False
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(folder / "checkpoints")
    if signal:
        cfg["trainer"]["callbacks"].append({"class_path": "signal_at.SignalAt", "init_args": {
            "signal": signal, "at": "train", "step": step}})
    cfg["test_after_fit"] = False
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("step", [2, 5, 8])  # mid-epoch 0; the last step of epoch 0; mid-epoch 1
def test_an_imagefolder_run_with_workers_resumes_bitwise(tmp_path, capsys, step):
    root, whole, parts = tmp_path / "images", tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    assert main(["fit", "--config", str(imagefolder_config(whole, root))]) == 0
    assert main(["fit", "--config", str(imagefolder_config(parts, root, "SIGTERM", step))]) == 143
    assert final_state(parts)[0] == step + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(imagefolder_config(parts, root)), "--ckpt_path", "last"]) == 0
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert final_state(whole)[0] == 18 and same(final_state(parts), final_state(whole))


def test_a_ddp_run_resumes_bitwise_on_every_rank(tmp_path):
    """2 gloo processes, the signal to rank 1 only: both ranks stop after the same step, and the
    resumed run ends where the unstopped one does (each rank's shard position and signs)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}

    def fit(folder, *extra, signal=None):
        path = config(folder, signal, "train", 10)  # in epoch 1: the order of a later epoch
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"].update(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2)
        if signal:
            cfg["trainer"]["callbacks"][-1]["init_args"]["rank"] = 1
        path.write_text(yaml.safe_dump(cfg))
        return subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--config", str(path), *extra],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=600)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    assert fit(whole).returncode == 0
    stopped = fit(parts, signal="SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert final_state(parts)[0] == 11
    resumed = fit(parts, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr
    a, b = final_state(whole), final_state(parts)
    assert a[0] == 16 and len(a[3]) == 2 and same(a, b)

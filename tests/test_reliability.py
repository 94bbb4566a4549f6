"""Divergence guard, SIGTERM preemption, SIGKILL crash recovery, atomic checkpoints."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import ep_estimator
from pcn_ep.training.callbacks import AtomicCheckpointIO
from pcn_ep.core import MLP, DivergenceError
from pcn_ep.data import TensorDataModule
from pcn_ep.training.module import PCNEPModule
from test_training import final_weights, tiny_config


class Poisoned(TensorDataModule):
    """48 examples; the batches listed in ``bad`` contain a NaN input."""

    num_classes = 3

    def __init__(self, bad, batch_size=8):
        super().__init__(batch_size)
        self.bad = bad

    def setup(self, stage=None):
        x = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
        for b in self.bad:
            x[b * self.batch_size, 0] = float("nan")
        y = torch.arange(48) % 3
        self.splits = {"train": (x, y), "val": (x[:8].nan_to_num(), y[:8]), "test": (x, y)}

    def train_dataloader(self):  # fixed order, so the poisoned batches are known
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*self.splits["train"]),
                                           batch_size=self.batch_size)


class NaNInside(PCNEPModule):
    """A NaN that appears inside the step: the module's batch check (which would call a NaN input
    a data fault) is shown the batch without it, so the step itself meets the NaN."""

    def _valid_batch(self, x, y, where):
        return super()._valid_batch(x.nan_to_num(), y, where)


def _fit(module, data, tmp_path, **kw):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, **kw)
    trainer.fit(module, data)
    return trainer


def test_divergence_stops_with_epoch_and_step(tmp_path):
    torch.manual_seed(0)
    module = NaNInside(MLP(6, 3, hidden=(8,)), K=2)
    with pytest.raises(DivergenceError, match="epoch 0, step 2"):
        _fit(module, Poisoned(bad=[2]), tmp_path)


def test_divergence_can_skip_batches_up_to_a_limit(tmp_path):
    torch.manual_seed(0)
    module = NaNInside(MLP(6, 3, hidden=(8,)), K=2, on_divergence="skip", max_skipped=2)
    _fit(module, Poisoned(bad=[1, 4]), tmp_path)
    assert module.skipped_batches == 2
    assert all(torch.isfinite(p).all() for p in module.network.parameters())
    module = NaNInside(MLP(6, 3, hidden=(8,)), K=2, on_divergence="skip", max_skipped=1)
    with pytest.raises(DivergenceError, match="after skipping 1 batches"):
        _fit(module, Poisoned(bad=[1, 4]), tmp_path)


def test_nudged_phase_divergence_names_phase_and_layer():
    torch.manual_seed(0)
    net = MLP(6, 3, hidden=(8, 8))
    # finite free state; an absurd nudge overflows float32 inside the relaxation
    with pytest.raises(DivergenceError, match=r"layer \d after the \+beta/-beta nudged phase"):
        ep_estimator("mse", beta=1e30, K=4)(net, torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(3)}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(Exception):
        io.save_checkpoint({"a": lambda: 0}, tmp_path / "last.ckpt")  # unpicklable
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["a"], torch.ones(3))


def _start(path, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "pcn_ep", "fit", "--config", str(path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _slow_config(tmp_path, *callbacks):
    path, cfg = tiny_config(tmp_path, K=12, t_max=3)
    cfg["trainer"].update(max_epochs=3, limit_train_batches=None)
    cfg["trainer"]["callbacks"] += list(callbacks)
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)


def test_sigterm_saves_a_resumable_checkpoint_and_the_run_completes(tmp_path):
    """A SIGTERM from another process, in training (the run waits for it at step 3: under load,
    a second's sleep after the run folder appeared once landed in setup instead)."""
    marker = tmp_path / "at_step_3"
    path = _slow_config(tmp_path, {"class_path": "signal_at.SignalAt", "init_args": {
        "signal": None, "at": "train", "step": 3, "marker": str(marker)}})
    proc = _start(path)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM: stopped, not finished
    assert "--ckpt_path last" in err.splitlines()[-1]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 4   # after step 3, never cut short
    resumed = _start(_slow_config(tmp_path), "--ckpt_path", "last")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    done = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert done["epoch"] == 2 and all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    path = _slow_config(tmp_path)
    proc = _start(path)
    _wait_for(tmp_path / "checkpoints" / "last.ckpt", proc)
    time.sleep(0.5)
    proc.kill()
    proc.communicate()
    torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)  # complete and readable
    # what a kill in the middle of a save leaves (AtomicCheckpointIO's temporary name)
    leftover = tmp_path / "checkpoints" / f".last.ckpt.partial-{proc.pid}"
    leftover.write_bytes(b"half a checkpoint")
    resumed = _start(path, "--ckpt_path", "last")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    assert not leftover.exists()
    assert [p.name for p in (tmp_path / "checkpoints").glob(".*partial*")] == []


def _imagenet(path, backend="ffcv"):
    return ["--data", "pcn_ep.data.ImageNetDataModule", "--data.train_path", str(path),
            "--data.val_path", str(path), "--data.backend", backend, "--data.num_workers", "0",
            "--data.num_classes", "10"]


@pytest.mark.parametrize("case", ["missing root", "corrupt beton", "no classes", "classes",
                                  "model", "rule", "scheme", "beta", "K", "batch too large",
                                  "misspelt key", "trainer misconfigured"])
def test_bad_input_gives_one_error_line_and_keeps_saved_files(tmp_path, capsys, case):
    from pcn_ep.training.cli import main

    path, _ = tiny_config(tmp_path)
    saved = tmp_path / "checkpoints" / "last.ckpt"
    saved.parent.mkdir()
    saved.write_bytes(b"an earlier checkpoint")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.beton").write_bytes(b"\0" * 1000)
    override, expect = {
        "missing root": (_imagenet(tmp_path / "nowhere"), "nowhere"),
        "corrupt beton": (_imagenet(tmp_path / "bad.beton"), "bad.beton"),
        "no classes": (_imagenet(tmp_path / "empty", "folder"), "class"),
        "classes": (["--model.network.init_args.num_classes", "12"], "10 classes"),
        "model": (["--model.network", "pcn_ep.core.VGG99"], "VGG99"),
        "rule": (["--model.rule", "newton"], "newton"),
        "scheme": (["--model.scheme", "sideways"], "sideways"),
        "beta": (["--model.beta", "0"], "beta"),
        "K": (["--model.K", "0"], "K (nudge"),
        "batch too large": (["--data.init_args.batch_size", "5000", "--data.init_args.drop_last",
                             "true"], "exceeds"),
        "misspelt key": (["--model.rull", "pgd"], "model.rull"),
        "trainer misconfigured": (["--trainer.logger", "false",
                                   "--trainer.callbacks+=LearningRateMonitor"], "LearningRateMonitor"),
    }[case]
    code = main(["fit", "--config", str(path), *override])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line.lower()]
    assert code != 0 and len(errors) == 1 and expect in errors[0], err
    assert "Traceback" not in err
    assert saved.read_bytes() == b"an earlier checkpoint"


class PoisonedSecondEpoch(Poisoned):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        if self.trainer.training and self.trainer.current_epoch == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y


def test_a_diverged_step_never_reaches_a_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = NaNInside(MLP(6, 3, hidden=(8,)), K=2)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    with pytest.raises(DivergenceError, match="epoch 1"):
        trainer.fit(module, PoisonedSecondEpoch(bad=[]))
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())

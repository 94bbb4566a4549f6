"""What a run writes for a log file: progress as plain lines when stdout is not a terminal (a
cluster job), one checkpoint name pattern whatever the config, and ``test`` saying what it
evaluated."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcn_ep.training.cli import DEFAULT_CONFIG, main

CONFIGS = Path(DEFAULT_CONFIG).parent
# epoch and step, then the monitored metric and its value: epoch01-step0016-val_top1_error0.8750.ckpt
PATTERN = re.compile(r"epoch\d{2,}-step\d{4,}-val_top[15]_error\d\.\d{4}\.ckpt")


def tiny(folder: Path, checkpoint: dict | None = None) -> Path:
    """The embedded default, shrunk to 2 epochs of 8 batches, logging to CSV only; its progress
    display left as the CLI chooses. ``checkpoint``: another config's ModelCheckpoint settings."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    cfg["trainer"].update(max_epochs=2, limit_train_batches=8, limit_val_batches=2,
                          limit_test_batches=2, default_root_dir=str(folder))
    cfg["trainer"]["logger"] = [{"class_path": "pcn_ep.training.loggers.CSVLogger",
                                 "init_args": {"save_dir": str(folder), "name": "csv"}}]
    callbacks = cfg["trainer"]["callbacks"]
    if checkpoint is not None:
        callbacks[0]["init_args"] = dict(checkpoint)
    callbacks[0]["init_args"]["dirpath"] = str(folder / "checkpoints")
    cfg["model"]["network"]["init_args"]["width_mult"] = 0.0625
    cfg["test_after_fit"] = False
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def model_checkpoint(config: str) -> dict:
    """A shipped config's ModelCheckpoint settings."""
    callbacks = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["callbacks"]
    return next(c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """``python -m pcn_ep fit`` of the tiny quickstart with stdout and stderr pipes, as in a job."""
    folder = tmp_path_factory.mktemp("piped")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--config", str(tiny(folder))],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def test_progress_in_a_log_is_a_line_per_epoch_without_carriage_returns(piped_run):
    _, done = piped_run
    assert "\r" not in done.stdout and "\r" not in done.stderr
    epochs = [line for line in done.stdout.splitlines() if re.match(r"epoch [01] \([12] of 2\): 8 steps in ", line)]
    assert len(epochs) == 2, done.stdout
    assert "val/top1_error" in epochs[-1], epochs
    assert len(done.stdout.splitlines()) < 60, done.stdout


def test_checkpoints_of_two_configs_follow_one_pattern(piped_run, tmp_path):
    """The quickstart (monitors top-1) and the VGG10 config's checkpoint settings (top-5)."""
    quickstart = sorted(p.name for p in (piped_run[0] / "checkpoints").glob("*.ckpt"))
    assert main(["fit", "--config", str(tiny(tmp_path, model_checkpoint("vgg10.yaml"))),
                 "--trainer.enable_progress_bar", "false"]) == 0
    vgg10 = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    for names, metric in ((quickstart, "val_top1_error"), (vgg10, "val_top5_error")):
        best = [name for name in names if name != "last.ckpt"]
        assert len(best) == 1 and PATTERN.fullmatch(best[0]) and metric in best[0], names


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_no_config_names_its_checkpoints_its_own_way(config):
    """The pattern is set in one place (``cli.checkpoint_name``), so no config sets ``filename``."""
    callbacks = (yaml.safe_load((CONFIGS / config).read_text()).get("trainer") or {}).get("callbacks") or []
    named = [c for c in callbacks if "filename" in (c.get("init_args") or {})]
    assert not named, named


def test_test_says_which_checkpoint_it_evaluated_on_which_split(piped_run, capsys):
    folder, _ = piped_run
    last = folder / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["test", "--config", str(folder / "config.yaml"), "--ckpt_path", "last",
                 "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("pcn_ep: done."):]
    assert f"evaluated: checkpoint {last.resolve()}, on the test split" in summary, summary
    assert "test error: top1 " in summary
    assert "best checkpoint" not in summary and "last checkpoint" not in summary, summary

"""Every stop signal, wherever the command is (setup, the sanity check, training, the validation
inside fit, validate, test, the test after fit): exit 128 + the signal (143 for SLURM's SIGUSR1),
one ``pcn_ep: stopped by ...`` line saying what is on disk, and a W&B run that ends ``stopped``.
The signal comes from the run itself (``signal_at.SignalAt``), so each case lands where it says."""
import shutil

import pytest
import torch
import yaml

from pcn_ep.training.cli import main
from test_training import tiny_config
from test_usability import wandb_summary

CODES = {"SIGTERM": 143, "SIGUSR1": 143, "SIGHUP": 129, "SIGINT": 130}


def signalled_config(tmp_path, signal, at, step=0, times=1, wandb=False, test_after_fit=False):
    path, cfg = tiny_config(tmp_path)
    cfg["trainer"]["callbacks"].append({"class_path": "signal_at.SignalAt", "init_args": {
        "signal": signal, "at": at, "step": step, "times": times}})
    if wandb:
        cfg["trainer"]["logger"].append({"class_path": "pcn_ep.training.loggers.WandbLogger",
                                         "init_args": {"save_dir": str(tmp_path), "project": "t"}})
    cfg["test_after_fit"] = test_after_fit
    path.write_text(yaml.safe_dump(cfg))
    return path


def stop_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pcn_ep:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def saved(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True) if last.exists() else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run, for the evaluation commands."""
    folder = tmp_path_factory.mktemp("trained")
    assert main(["fit", "--config", str(tiny_config(folder)[0])]) == 0
    return folder / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("signal, at, says, step_saved", [
    ("SIGTERM", "setup", "before training started: no checkpoint on disk", None),
    ("SIGHUP", "sanity", "before training started: no checkpoint on disk", None),
    ("SIGUSR1", "train", "after saving", 4),  # during step 3: the step ends, then the save
    ("SIGINT", "train", "after saving", 4),
    ("SIGINT", "fit_validation", "after saving", 9),  # the validation ends, then one more step
])
def test_a_signal_during_fit_stops_it_saying_what_is_on_disk(tmp_path, capsys, signal, at, says,
                                                             step_saved):
    code = main(["fit", "--config", str(signalled_config(tmp_path, signal, at, step=3 if at == "train" else 0,
                                                          wandb=True))])
    line = stop_line(capsys.readouterr().err)
    assert code == CODES[signal] and line.startswith(f"pcn_ep: stopped by {signal} {says}"), line
    state = saved(tmp_path)
    assert (state and state["global_step"]) == step_saved
    assert wandb_summary(tmp_path)["run/status"] == "stopped"


@pytest.mark.parametrize("command, signal", [("validate", "SIGTERM"), ("test", "SIGHUP"),
                                             ("test", "SIGUSR1"), ("validate", "SIGINT")])
def test_a_signal_during_an_evaluation_command_is_not_a_success(tmp_path, capsys, trained,
                                                                 command, signal):
    """Lightning's own SIGTERM handler ends an evaluation with SystemExit() (exit 0, no word)."""
    path = signalled_config(tmp_path, signal, command)
    code = main([command, "--config", str(path), "--ckpt_path", str(trained)])
    line = stop_line(capsys.readouterr().err)
    assert code == CODES[signal], line
    assert line == f"pcn_ep: stopped by {signal} during {command}: nothing to save ({command} only reads the weights)"


def test_a_signal_during_the_test_after_fit_says_training_had_finished(tmp_path, capsys):
    path = signalled_config(tmp_path, "SIGTERM", "test", wandb=True, test_after_fit=True)
    assert main(["fit", "--config", str(path)]) == 143
    line = stop_line(capsys.readouterr().err)
    assert "during the test that follows fit: training had finished" in line, line
    assert saved(tmp_path)["epoch"] == 1  # both epochs kept
    assert wandb_summary(tmp_path)["run/status"] == "stopped"


def test_a_second_sigint_stops_at_once_and_says_what_is_on_disk(tmp_path, capsys, trained):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(trained, tmp_path / "checkpoints" / "last.ckpt")
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    path = signalled_config(tmp_path, "SIGINT", "sanity", times=2)
    code = main(["fit", "--config", str(path), "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    line = stop_line(capsys.readouterr().err)
    assert code == 130 and line.startswith("pcn_ep: stopped at once by a second signal (SIGINT"), line
    assert f"last checkpoint on disk: {tmp_path / 'checkpoints' / 'last.ckpt'}" in line, line
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before

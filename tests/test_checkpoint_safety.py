"""A checkpoint is data: nothing in one runs code, and a file the command cannot use is one line
naming it before anything runs (docs/faults.md, "Security")."""
import os
import shutil
import tempfile

import pytest
import torch

from pcn_ep.training.callbacks import CheckpointError, load_checkpoint
from pcn_ep.training.cli import main
from test_training import tiny_config


class Payload:
    """What an attacker pickles: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    assert main(["fit", "--config", str(tiny_config(folder)[0])]) == 0
    return folder / "checkpoints" / "last.ckpt"


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pcn_ep:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command, ckpt, extra", [
    ("fit", "evil", []), ("validate", "evil", []), ("test", "evil", []),
    ("test", "evil", ["--weights_only", "true"]), ("fit", "last", []),
])
def test_a_malicious_checkpoint_runs_nothing(tmp_path, capsys, trained, command, ckpt, extra):
    marker = tmp_path / "marker"
    saved = torch.load(trained, weights_only=True)
    saved["payload"] = Payload(marker)
    evil = tmp_path / "checkpoints" / "last.ckpt" if ckpt == "last" else tmp_path / "evil.ckpt"
    evil.parent.mkdir(exist_ok=True)
    torch.save(saved, evil)
    path = tiny_config(tmp_path)[0]
    code = main([command, "--config", str(path), "--ckpt_path", ckpt if ckpt == "last" else str(evil), *extra])
    line = one_line(capsys)
    assert code == 1 and not marker.exists()
    assert line.startswith(f"pcn_ep: error: refused to load checkpoint {evil}") and "posix.system" in line, line


def test_load_checkpoint_reads_our_own_and_refuses_code(tmp_path, trained):
    assert set(load_checkpoint(trained)) >= {"state_dict", "optimizer_states", "sign_generators"}
    torch.save({"state_dict": {}, "x": Payload(tmp_path / "marker")}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="posix.system"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "marker").exists()


def _variant(trained, tmp_path, name):
    saved = torch.load(trained, weights_only=True)
    if name == "hand-saved":
        saved = {"state_dict": saved["state_dict"]}
    elif name == "weights-only":
        for key in ("optimizer_states", "lr_schedulers", "loops"):
            saved.pop(key)
    elif name == "extra-tensor":
        saved["state_dict"]["network.extra"] = torch.zeros(1)
    elif name == "non-tensor":
        saved["state_dict"]["network.layers.0.weight"] = [1.0, 2.0]
    elif name == "truncated":
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(trained.read_bytes()[:2000])
        return path
    path = tmp_path / f"{name}.ckpt"
    torch.save(saved, path)
    return path


@pytest.mark.parametrize("command, name, says", [
    ("test", "hand-saved", "was not saved by Lightning"),
    ("fit", "weights-only", "cannot resume training: it has no loops"),
    ("test", "extra-tensor", "does not fit this network: it has network.extra"),
    ("validate", "non-tensor", "state_dict entry network.layers.0.weight is a list, not a tensor"),
    ("fit", "truncated", "is not readable (truncated or corrupt?)"),
])
def test_a_checkpoint_lightning_would_trip_over_is_one_line(tmp_path, capsys, trained, command, name, says):
    path = tiny_config(tmp_path)[0]
    code = main([command, "--config", str(path), "--ckpt_path", str(_variant(trained, tmp_path, name))])
    line = one_line(capsys)
    assert code == 1 and says in line, line


def test_ckpt_path_best_reads_the_best_checkpoint_that_last_records(tmp_path, capsys, trained):
    folder = trained.parent.parent
    code = main(["test", "--config", str(tiny_config(folder)[0]), "--ckpt_path", "best"])
    assert code == 0
    out = capsys.readouterr().out
    best = sorted(trained.parent.glob("epoch*.ckpt"))
    assert len(best) == 1 and str(best[0]) in torch.load(trained, weights_only=True)["callbacks"].__repr__()
    assert "test error" in out


def test_checkpoints_are_written_beside_their_destination_not_in_tmpdir(tmp_path, monkeypatch):
    """Lightning's own writer goes through fsspec, whose transaction stages the whole file in
    TMPDIR (a kill there leaves a checkpoint-sized file that no run removes; a small TMPDIR on a
    cluster node fails the save). With a TMPDIR that cannot hold anything, ours still saves."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    run = tmp_path / "run"
    run.mkdir()
    assert main(["fit", "--config", str(tiny_config(run)[0])]) == 0
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "no-such-tmpdir").exists()


def test_a_partial_file_left_by_a_kill_is_removed_by_the_next_run(tmp_path, trained):
    shutil.copytree(trained.parent, tmp_path / "checkpoints")
    partial = tmp_path / "checkpoints" / ".last.ckpt.partial-12345"
    partial.write_bytes(b"half a checkpoint")
    assert main(["fit", "--config", str(tiny_config(tmp_path)[0]), "--trainer.max_epochs", "3",
                 "--ckpt_path", "last"]) == 0
    assert not partial.exists()

"""The commands outside Lightning's CLI (gradcheck, bench, energy, parity, reproduce) read every
user-facing value once and bound it: an impossible number, an unwritable output path or a bad
checkpoint is one ``pcn_ep: error:`` line before any work, and no checkpoint runs code."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from pcn_ep.__main__ import main
from pcn_ep.experiments import parity, reproduce

QUICKSTART = str(reproduce.CONFIGS / "quickstart.yaml")
MISSING = "/no/such/folder/out.json"

BAD = [  # (command, flag, bad value(s), the other arguments it needs)
    *[("gradcheck", flag, value, []) for flag, value in [
        ("--num-classes", "1"), ("--batch-size", "0"), ("--K", "0"), ("--beta", "0"),
        ("--beta", "-0.1"), ("--beta", "nan"), ("--beta", "inf"), ("--width-mult", "0"),
        ("--input-size", "0"), ("--in-channels", "-1"), ("--alpha", "0"), ("--alpha", "1.5"),
        ("--seed", "-1"), ("--min-cosine", "nan"), ("--max-rel-err", "-1"), ("--K", "2.5")]],
    *[("bench", flag, value, []) for flag, value in [
        ("--steps", "0"), ("--batch-size", "0"), ("--K", "-1"), ("--beta", "0"), ("--at", "0"),
        ("--batch-sizes", ["8", "0"]), ("--batch-sizes", ["8", "8"]), ("--seed", "-1"),
        ("--width-mult", "-1"), ("--num-classes", "0"), ("--out", MISSING)]],
    *[("energy", flag, value, ["--config", QUICKSTART, "--out", "e.json"]) for flag, value in [
        ("--images", "0"), ("--K-max", "0"), ("--seed", "-1"), ("--out", MISSING), ("--out", "/")]],
    *[("parity", flag, value, []) for flag, value in [
        ("--threads", "0"), ("--json", MISSING), ("--json", "/"), ("--n-bits", "0"),
        ("--k-sparse", "0"), ("--n-train", "0"), ("--n-test", "-3"), ("--epochs", "0"),
        ("--seeds", "-1")]],
    *[("reproduce", flag, value, ["fig_init_gain"]) for flag, value in [
        ("--seeds", "-1"), ("--seeds", ["1", "1"]), ("--jobs", "0"), ("--gpus", "-1"),
        ("--cpus-per-task", "0"), ("--gpus-per-run", "-1"), ("--time", "0")]],
]


@pytest.mark.parametrize("command, flag, value, extra", BAD,
                         ids=[f"{c} {f} {v}" for c, f, v, _ in BAD])
def test_an_impossible_value_is_one_error_line_naming_the_flag(command, flag, value, extra, capsys,
                                                                tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = value if isinstance(value, list) else [value]
    with pytest.raises(SystemExit) as done:
        main([command, *extra, flag, *values])
    out, err = capsys.readouterr()
    assert done.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"pcn_ep: error: {command}: ") and flag in err and values[-1] in err, err
    assert not out and os.listdir(tmp_path) == []  # nothing ran, nothing written


def test_the_known_failures_are_refused(capsys):
    """The issue's examples: each used to run (a FAIL verdict, seed-1/, a statistics error, a
    ZeroDivisionError); now each stops while the flags are read."""
    for argv, text in ((["gradcheck", "--num-classes", "1"], "must be an integer >= 2, got '1'"),
                       (["reproduce", "fig_init_gain", "--seeds", "-1"], "got '-1'"),
                       (["bench", "--steps", "0"], "--steps: must be an integer >= 1"),
                       (["bench", "--batch-size", "0"], "--batch-size: must be an integer >= 1")):
        with pytest.raises(SystemExit):
            main(argv)
        assert text in capsys.readouterr().err


def _one_error_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcn_ep: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]


def _evil_checkpoint(path, marker):
    class Evil:
        __reduce__ = lambda self: (os.system, (f"touch {marker}",))  # noqa: E731

    torch.save({"state_dict": {}, "x": Evil()}, path)


def test_energy_never_runs_code_from_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "ran"
    _evil_checkpoint(evil, marker)
    code = main(["energy", "--config", QUICKSTART, "--out", "e.json", "--ckpt", str(evil)])
    assert code == 1 and not marker.exists()
    _one_error_line(capsys.readouterr().err, "energy:", str(evil), "refused")
    assert not (tmp_path / "e.json").exists()


def test_reproduce_checks_the_energy_checkpoint_before_any_run(tmp_path, capsys, monkeypatch):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "ran"
    _evil_checkpoint(evil, marker)
    monkeypatch.setattr(reproduce, "run_one", lambda *a, **k: pytest.fail("a run started"))
    for ckpt, why in ((evil, "refused"), (tmp_path / "none.ckpt", "not found"), (tmp_path, "folder")):
        code = main(["reproduce", "fig_energy", "--smoke", "--out", str(tmp_path / "out"),
                     "--energy-ckpt", str(ckpt)])
        assert code == 2 and not marker.exists()
        _one_error_line(capsys.readouterr().err, "--energy-ckpt", str(ckpt), why)
    assert not (tmp_path / "out").exists()


def _truncated(path):
    torch.save({"state_dict": {"network.layers.0.weight": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("make, why", [
    (lambda p: None, "checkpoint not found"),
    (lambda p: p.mkdir(), "is a folder"),
    (_truncated, "not readable"),
    (lambda p: p.write_bytes(b""), "not readable"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), "no state_dict"),
])
def test_energy_names_an_unusable_checkpoint_in_one_line(make, why, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "w.ckpt"
    make(ckpt)
    assert main(["energy", "--config", QUICKSTART, "--out", "e.json", "--ckpt", str(ckpt)]) == 1
    _one_error_line(capsys.readouterr().err, "energy:", str(ckpt), why)


@pytest.mark.parametrize("state, why", [
    ({"network.layers.0.weight": torch.zeros(3, 3)},
     "network.layers.0.weight is (3, 3), the network's is (16, 1, 3, 3)"),
    ({"network.layers.9.weight": torch.zeros(1)}, "it holds network.layers.9.weight"),
    ({}, "it lacks network.layers.0.weight (and 9 more tensors)"),
])
def test_energy_names_the_first_tensor_that_does_not_fit(state, why, tmp_path, capsys, monkeypatch):
    """A checkpoint of another network (quickstart's VGG5 at 1/16 width here)."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": state}, ckpt)
    assert main(["energy", "--config", QUICKSTART, "--out", "e.json", "--ckpt", str(ckpt)]) == 1
    _one_error_line(capsys.readouterr().err, f"checkpoint {ckpt} does not fit", why)
    assert not (tmp_path / "e.json").exists()


def test_parity_json_into_a_missing_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(parity, "run", lambda *a, **k: pytest.fail("a run started"))
    target = tmp_path / "missing" / "rows.json"
    with pytest.raises(SystemExit) as done:
        main(["parity", "--n-bits", "3", "--k-sparse", "2", "--n-train", "8", "--n-test", "8",
              "--seeds", "0", "--epochs", "1", "--json", str(target)])
    assert done.value.code == 2
    _one_error_line(capsys.readouterr().err, "parity: argument --json", str(target),
                    "does not exist")


def test_reproduce_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "results").write_text("")
    assert main(["reproduce", "fig_init_gain", "--smoke", "--dry-run", "--out",
                 str(tmp_path / "results")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "is a file")


def _run_exiting(tmp_path, monkeypatch, code: str) -> tuple[dict, bool]:
    monkeypatch.setattr(reproduce, "command", lambda *a: [sys.executable, "-c", code])
    args = reproduce.parser().parse_args(["fig_init_gain", "--smoke", "--out", str(tmp_path)])
    args.threads = 1
    table = reproduce.TABLES["fig_init_gain"]
    record = reproduce.run_one(table, table.cells()[0], 0, args, [])
    return record, reproduce.finished(reproduce.run_folder(tmp_path, table, table.cells()[0], 0))


@pytest.mark.parametrize("rc, name", [(129, "SIGHUP"), (130, "SIGINT"), (143, "SIGTERM")])
def test_a_run_stopped_by_any_signal_is_stopped_and_resumed(rc, name, tmp_path, monkeypatch):
    record, finished = _run_exiting(
        tmp_path, monkeypatch, f"import sys; print('pcn_ep: stopped by {name}'); sys.exit({rc})")
    assert record["status"] == "stopped" and record["returncode"] == rc and not finished
    assert f"stopped by {name}" in record["error"]
    # the rerun resumes: a fit command for a run folder holding last.ckpt ends with --ckpt_path=last
    monkeypatch.undo()
    args = reproduce.parser().parse_args(["fig_init_gain", "--smoke", "--out", str(tmp_path)])
    table = reproduce.TABLES["fig_init_gain"]
    run_dir = reproduce.run_folder(tmp_path, table, table.cells()[0], 0)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert reproduce.command(table, table.cells()[0], 0, run_dir, args, 0)[-1] == "--ckpt_path=last"


def test_a_run_killed_by_a_signal_is_failed_and_named(tmp_path, monkeypatch):
    record, finished = _run_exiting(tmp_path, monkeypatch,
                                    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert record["status"] == "failed" and record["error"] == "killed by SIGKILL" and not finished
    record, finished = _run_exiting(tmp_path, monkeypatch, "print('fine')")
    assert record["status"] == "ok" and finished
    assert json.loads((reproduce.run_folder(tmp_path, reproduce.TABLES["fig_init_gain"],
                                            reproduce.TABLES["fig_init_gain"].cells()[0], 0)
                       / "run.json").read_text())["status"] == "ok"

"""One run, one history (issue 24): a run folder's run stopped and resumed, tested after fit and
tested again later is one W&B run (one id: one offline folder per command, synced into one run)
and one ``metrics.csv`` whose steps never go back; the report reads it as one run. The stops come
from the run itself (``signal_at.SignalAt``), so each lands at a known step; nothing waits for
time."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pcn_ep.experiments import report
from pcn_ep.training import loggers
from pcn_ep.training.cli import main
from pcn_ep.training.loggers import RUN_ID_FILE, CSVLogger, WandbLogger, transaction_log_finished
from test_training import tiny_config

TESTS = Path(__file__).resolve().parent
# what reproduce gives a run's W&B logger: the report reads such a run as one cell of a table
CELL = {"table": "fig_init_gain", "cell": {"output_gain": 0.2, "method": "ep"}, "seed": 0,
        "smoke": True}
STEPS = 16  # tiny_config: 2 epochs of 8 steps


def history_config(tmp_path: Path, stop: tuple[str, int] | None = None,
                   test_after_fit: bool = False) -> Path:
    """tiny_config logging as the configs do (pcn_ep's CSVLogger and WandbLogger, every step);
    ``stop``: (signal, training step) at which the run signals itself."""
    _, cfg = tiny_config(tmp_path)
    root = str(tmp_path)
    cfg["trainer"]["logger"] = [
        {"class_path": "pcn_ep.training.loggers.CSVLogger",
         "init_args": {"save_dir": root, "name": "csv"}},
        {"class_path": "pcn_ep.training.loggers.WandbLogger",
         "init_args": {"save_dir": root, "project": "t", "group": CELL["table"], "config": CELL}}]
    cfg["trainer"]["log_every_n_steps"] = 1
    if stop:
        cfg["trainer"]["callbacks"].append({"class_path": "signal_at.SignalAt", "init_args": {
            "signal": stop[0], "at": "train", "step": stop[1]}})
    cfg["test_after_fit"] = test_after_fit
    path = tmp_path / (f"stop_{stop[0]}.yaml" if stop else "resume.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def csv_rows(tmp_path: Path) -> list[dict]:
    """The run folder's one CSV history (no ``version_N``), its steps never going back."""
    files = sorted(tmp_path.rglob("metrics.csv"))
    assert files == [tmp_path / "csv" / "metrics.csv"], files
    with open(files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(float(r["step"])) for r in rows]
    assert steps == sorted(steps), steps
    return rows


def steps_of(rows: list[dict], column: str) -> list[int]:
    return [int(float(r["step"])) for r in rows if r.get(column)]


def trained_once(steps: list[int]) -> bool:
    """Every training step's row once, in order, the stopped step's included."""
    return steps == list(range(STEPS))


def wandb_parts(tmp_path: Path) -> list[list]:
    """The records of the run folder's W&B folders, in order of start: all of one id, the one kept
    in wandb/run_id.txt, each written to its end (its exit record last)."""
    run_id = (tmp_path / "wandb" / RUN_ID_FILE).read_text().strip()
    files = sorted(tmp_path.rglob("run-*.wandb"))
    assert files and {f.name for f in files} == {f"run-{run_id}.wandb"}, files
    assert all(f.parent.parent == tmp_path / "wandb" for f in files), files
    parts = []
    for file in files:
        records = list(report._wandb_records(file))
        assert records[-1].WhichOneof("record_type") == "exit", file
        parts.append(records)
    return sorted(parts, key=lambda rs: next(r.run.start_time.ToNanoseconds() for r in rs
                                             if r.WhichOneof("record_type") == "run"))


def history(records) -> list[dict]:
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def summary(records) -> dict:
    found = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            found.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                          for i in r.summary.update})
    return found


def one_run(tmp_path: Path) -> report.Run:
    warnings = []
    runs = report.read_runs(tmp_path, warn=warnings.append)
    assert len(runs) == 1, (runs, warnings)
    return runs[0]


def test_a_run_stopped_mid_epoch_and_resumed_is_one_wandb_run_and_one_csv_history(tmp_path):
    """SIGTERM at the start of step 3 (steps 0-2 saved), then ``fit --ckpt_path last`` and the
    test after it. The finding: the resume opened csv/version_1/ and a second W&B run."""
    assert main(["fit", "--config", str(history_config(tmp_path, ("SIGTERM", 3)))]) == 143
    assert main(["fit", "--config", str(history_config(tmp_path, test_after_fit=True)),
                 "--ckpt_path", "last"]) == 0
    rows = csv_rows(tmp_path)
    assert trained_once(steps_of(rows, "train/error"))  # both parts, each step once
    assert [r["epoch"] for r in rows if r.get("val/top1_error")] == ["0", "1"]
    assert steps_of(rows, "test/top1_error") == [STEPS]            # the test after fit, last
    first, second = wandb_parts(tmp_path)                          # one per command
    steps = [h["trainer/global_step"] for h in history(first) + history(second)
             if "train/error" in h]
    assert trained_once(steps)                          # the x axis goes on
    assert [h["trainer/global_step"] for h in history(second) if "test/top1_error" in h] == [STEPS]
    assert summary(first)["run/status"] == "stopped" and summary(second)["run/status"] == "ok"
    run = one_run(tmp_path)
    assert run.status == "ok" and sorted(run.curves["val/top1_error"]) == [0, 1]
    assert "test/top1_error" in run.final


def test_a_separate_test_logs_into_the_runs_history_and_leaves_its_status(tmp_path):
    """A stopped run tested with ``test --ckpt_path last``, then resumed: the test is a row of the
    same CSV file and a part of the same W&B run, at the checkpoint's global step, without an
    epoch; it writes run/test_status, so the stopped run does not read ``ok``."""
    assert main(["fit", "--config", str(history_config(tmp_path, ("SIGTERM", 11)))]) == 143
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    resume = history_config(tmp_path)
    assert main(["test", "--config", str(resume), "--ckpt_path", "last"]) == 0
    rows = csv_rows(tmp_path)
    tested, = [r for r in rows if r.get("test/top1_error")]
    assert rows[-1] is tested and int(tested["step"]) == saved and tested["epoch"] == ""
    fit_part, test_part = wandb_parts(tmp_path)
    tests = [h for h in history(test_part) if "test/top1_error" in h]
    assert len(tests) == 1 and tests[0]["trainer/global_step"] == saved and "epoch" not in tests[0]
    assert summary(test_part)["run/test_status"] == "ok" and "run/status" not in summary(test_part)
    assert one_run(tmp_path).status == "stopped"
    assert main(["fit", "--config", str(resume), "--ckpt_path", "last"]) == 0
    rows = csv_rows(tmp_path)
    assert trained_once(steps_of(rows, "train/error"))
    assert steps_of(rows, "test/top1_error") == [saved]   # the separate test's row is kept
    assert len(wandb_parts(tmp_path)) == 3 and one_run(tmp_path).status == "ok"


def test_a_killed_run_resumed_drops_the_rows_of_the_steps_it_lost(tmp_path):
    """SIGKILL (nothing handled, nothing saved) at step 11: last.ckpt holds epoch 0 (step 8), and
    the CSV file holds the rows of steps 8-10 that the resume does again: they are dropped, so each
    step is one row and the steps never go back."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    env.pop("WANDB_SERVICE", None)  # its own W&B service, which dies with it
    killed = subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--config",
                             str(history_config(tmp_path, ("SIGKILL", 11)))],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        assert steps_of(list(csv.DictReader(f)), "train/error") == list(range(11))  # 8-10 lost
    assert main(["fit", "--config", str(history_config(tmp_path)), "--ckpt_path", "last"]) == 0
    rows = csv_rows(tmp_path)
    assert trained_once(steps_of(rows, "train/error"))
    assert [r["epoch"] for r in rows if r.get("val/top1_error")] == ["0", "1"]
    assert one_run(tmp_path).status == "ok"


def test_the_csv_history_keeps_earlier_rows_takes_new_columns_and_drops_a_cut_row(tmp_path):
    """Lightning 2.6's CSVLogger deletes an existing metrics.csv when it starts; a row cut off by
    a kill would be continued by the next one."""
    first = CSVLogger(str(tmp_path))
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    path = tmp_path / "csv" / "metrics.csv"
    with open(path, "a") as f:
        f.write("2.0")  # the start of a row, cut by a kill
    second = CSVLogger(str(tmp_path))
    second.log_metrics({"a": 3.0, "b": 4.0}, step=1)
    second.save()
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1.0", "b": "", "step": "0"},
                                           {"a": "3.0", "b": "4.0", "step": "1"}]
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["metrics.csv"]


def test_close_returns_only_once_wandb_has_written_the_run_to_its_end(tmp_path, monkeypatch):
    """The finding (a busy machine): ``finish()`` returns while W&B's service process still holds
    the last records, the summary with run/status among them; the report then read ``unknown``.
    Here the file reads unfinished three times: close waits for the state, however long."""
    answers = iter([False, False, False])
    seen = []

    def finished(path):
        seen.append(path)
        return next(answers, None) is None and transaction_log_finished(path)

    monkeypatch.setattr(loggers, "transaction_log_finished", finished)
    monkeypatch.setattr(loggers.time, "sleep", lambda s: None)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logger.log_metrics({"loss": 1.0}, step=0)
    file = Path(logger.experiment.settings.sync_file)
    logger.close("ok")
    assert len(seen) >= 4 and set(seen) == {file}
    assert summary(report._wandb_records(file))["run/status"] == "ok"


def test_the_end_of_a_wandb_file_is_found_in_its_last_block_and_never_in_a_cut_one(tmp_path):
    """``transaction_log_finished`` reads the tail only: a file of several 32 KiB blocks ending
    with its exit record is finished, also when a record of several blocks comes just before it
    (read back from the block where it begins); the same file cut anywhere is not."""
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    for step in range(400):
        logger.log_metrics({"x": float(step), "a long name " * 20: 1.0}, step=step)
    logger.experiment.summary["note"] = "x" * 100_000  # a record of 4 blocks near the end
    file = Path(logger.experiment.settings.sync_file)
    logger.close("ok")
    data = file.read_bytes()
    assert len(data) > 6 * 32768 and transaction_log_finished(file)
    ends = record_ends(data)
    assert ends[-1] == len(data) and len(ends) > 400
    cut = tmp_path / "cut.wandb"
    for end in [*ends[:-1], *range(8, len(data), 4099), len(data) - 1]:  # whole records or not
        cut.write_bytes(data[:end])
        assert not transaction_log_finished(cut), end


def record_ends(data: bytes) -> list[int]:
    """Where each record of a .wandb file ends (after its FULL or LAST chunk)."""
    ends, pos = [], 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:
            pos += left
            continue
        pos += 7 + length
        if kind in (1, 4):
            ends.append(pos)
    return ends


def test_a_run_id_file_that_holds_no_id_is_one_error_before_training(tmp_path, capsys):
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / RUN_ID_FILE).write_text("../../x\n")
    assert main(["fit", "--config", str(history_config(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert f"pcn_ep: error: {tmp_path / 'wandb' / RUN_ID_FILE} should hold" in err, err
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()

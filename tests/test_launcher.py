"""``reproduce TABLE --launcher slurm``: every run one submitit job that SLURM may stop (time limit,
preemption) and requeue, the requeued job resuming from its run's own last.ckpt. Checked with
submitit's local executor on the CPU, which signals and requeues a job as SLURM does."""
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pcn_ep.experiments import reproduce
from pcn_ep.experiments.tables import Cell, Table

# One smoke run long enough (3 epochs) to be stopped after its first epoch.
TINY = Table("tiny", "a one-run smoke table",
             functools.partial(list, [Cell({"method": "ep"}, "vgg5_mnist_mse.yaml",
                                           {"trainer.max_epochs": 3})]))


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _submitit_job() -> psutil.Process:
    """The submitit job's process among this test's descendants (which may hold zombies)."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "submitit.core._submit" in " ".join(child.cmdline()):
                return child
        except psutil.Error:  # ended meanwhile, or a zombie left by an earlier test
            continue
    pytest.fail("no submitit job among this process's children")


def test_a_signalled_job_saves_requeues_and_resumes_from_its_last_ckpt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "SLURM_CLUSTER", "local")
    monkeypatch.setitem(reproduce.TABLES, "tiny", TINY)
    run_dir = reproduce.run_folder(tmp_path, TINY, TINY.cells()[0], 0)
    result = {}
    sweep = threading.Thread(target=lambda: result.update(code=reproduce.main(
        ["tiny", "--smoke", "--launcher", "slurm", "--wait", "--no-report", "--out", str(tmp_path)])))
    sweep.start()
    try:
        _wait_for((run_dir / "checkpoints" / "last.ckpt").exists, 600, "the first epoch's last.ckpt")
        job = _submitit_job()
        (fit,) = job.children()
        # SLURM signals every process of the job: the fit process ignores submitit's signal, the
        # job's wrapper stops it with SIGTERM (last.ckpt after the current step) and requeues itself.
        os.kill(fit.pid, signal.SIGUSR2)
        time.sleep(0.5)
        os.kill(job.pid, signal.SIGUSR2)
        sweep.join(timeout=600)  # bounds for a broken run, not timings the test relies on
    finally:  # a failed wait must not leave the job training in the background of later tests
        if sweep.is_alive():
            for child in psutil.Process().children(recursive=True):
                try:
                    child.kill()
                except psutil.Error:
                    pass
            sweep.join(timeout=30)
    assert not sweep.is_alive() and result["code"] == 0, capsys.readouterr()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok" and "--ckpt_path=last" in record["command"]
    log = (run_dir / "log.txt").read_text()
    assert "stopped by SIGTERM after saving" in log        # the first attempt saved and stopped
    assert log.count("$ ") == 2                              # the second resumed
    out = capsys.readouterr().out
    assert "submitted 1 SLURM jobs" in out and "ok" in out


def test_dry_run_prints_what_each_job_asks_for_and_submits_nothing(tmp_path, capsys):
    argv = ["table_top5", "--launcher", "slurm", "--dry-run", "--partition", "gpu", "--account",
            "lab", "--time", "2-00:00:00", "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    header, *commands = capsys.readouterr().out.splitlines()
    for flag in ("--partition=gpu", "--account=lab", "--ntasks-per-node=8", "--gpus-per-node=8",
                 "--time=2880", "--requeue", "--signal=USR2@120"):
        assert flag in header
    assert len(commands) == 5
    assert all("--trainer.devices=8" in c and "--trainer.strategy=ddp" in c for c in commands)
    assert reproduce.main(["table_costs", "--launcher", "slurm", "--dry-run", "--gpus-per-run", "1",
                           "--out", str(tmp_path / "b")]) == 0
    header, *commands = capsys.readouterr().out.splitlines()
    assert "--gpus-per-node=1" in header and "--time=1440" in header
    assert len(commands) == 48 and all("--trainer.devices=1" in c and "strategy" not in c
                                       for c in commands)
    assert not list(tmp_path.rglob(".submitit")) and not list(tmp_path.rglob("run.json"))


def test_dry_run_leaves_out_the_runs_that_ended(tmp_path, capsys):
    args = ["fig_init_gain", "--smoke", "--launcher", "slurm", "--dry-run", "--out", str(tmp_path)]
    assert reproduce.main(args) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    table = reproduce.TABLES["fig_init_gain"]
    done = reproduce.run_folder(tmp_path, table, table.cells()[0], 0)
    (done / "run.json").write_text(json.dumps({"status": "ok", "smoke": True}))
    assert reproduce.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "would submit 3 SLURM jobs" in lines[0] and len(lines) == 4


def test_the_jobs_sbatch_script_requeues_and_signals_before_the_time_limit(tmp_path, monkeypatch):
    """The parameters as submitit writes them into the sbatch script (srun faked present)."""
    import submitit
    from submitit.slurm import slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    args = reproduce.parser().parse_args(["table_costs", "--partition", "p", "--account", "a",
                                          "--time", "90", "--gpus-per-run", "2"])
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**reproduce.slurm_parameters(reproduce.TABLES["table_costs"], args))
    script = executor._executor._make_submission_file_text("CMD", "uid")
    for line in ("--partition=p", "--account=a", "--time=90", "--gpus-per-node=2",
                 "--ntasks-per-node=2", "--requeue", f"--signal=USR2@{reproduce.SIGNAL_DELAY_S}"):
        assert f"#SBATCH {line}" in script


def test_time_limits_read_as_slurm_writes_them(capsys):
    assert [reproduce.slurm_minutes(t) for t in ("90", "1:30:00", "2-00:00:00", "0:00:30")] == \
        [90, 90, 2880, 1]
    with pytest.raises(SystemExit):
        reproduce.parser().parse_args(["table_costs", "--time", "two days"])
    assert "expects MINUTES, HH:MM:SS or D-HH:MM:SS" in capsys.readouterr().err


def test_no_slurm_on_this_host_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # no srun to be found
    done = subprocess.run([sys.executable, "-m", "pcn_ep", "reproduce", "fig_init_gain", "--smoke",
                           "--launcher", "slurm", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("pcn_ep: error: cannot submit to SLURM") and "srun" in done.stderr


def test_the_scripts_pass_the_launcher_through(tmp_path):
    done = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "reproduce" / "table_schemes.sh"), "--smoke",
                           "--launcher", "slurm", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# would submit 24 SLURM jobs")


def test_a_run_stopped_by_a_signal_is_recorded_stopped_and_run_again(tmp_path, monkeypatch):
    """Exit 143 (SIGTERM from SLURM itself, say): not 'failed', and not finished either."""
    stop = "import sys; print('pcn_ep: stopped by SIGTERM after saving last.ckpt'); sys.exit(143)"
    monkeypatch.setattr(reproduce, "command", lambda *a: [sys.executable, "-c", stop])
    args = reproduce.parser().parse_args(["fig_init_gain", "--smoke", "--out", str(tmp_path)])
    args.threads = 1
    table = reproduce.TABLES["fig_init_gain"]
    record = reproduce.run_one(table, table.cells()[0], 0, args, [])
    assert record["status"] == "stopped" and "stopped by SIGTERM" in record["error"]
    assert not reproduce.finished(reproduce.run_folder(tmp_path, table, table.cells()[0], 0))


def test_a_corrupt_record_or_marker_is_read_as_none_and_the_run_runs_again(tmp_path, monkeypatch, capsys):
    """A run.json cut by a kill, hand-edited into a list, or a folder in its place; a marker that
    is not JSON: no traceback. The run is not finished (so it runs again) and the root's kind is
    read from what is readable."""
    table = reproduce.TABLES["fig_init_gain"]
    folder = reproduce.run_folder(tmp_path, table, table.cells()[0], 0)
    folder.mkdir(parents=True)
    for bad in ('{"status": "ok", "se', '["ok"]', '{"status": 1}'):
        (folder / "run.json").write_text(bad)
        assert reproduce.stored_record(folder) is None and not reproduce.finished(folder)
    (folder / "run.json").unlink()
    (folder / "run.json").mkdir()
    assert not reproduce.finished(folder)
    (tmp_path / reproduce.MARKER).write_text("{not json")
    assert reproduce.claim_root(tmp_path, smoke=True) is None   # rewritten as a smoke root
    assert "not reproduce's marker" in capsys.readouterr().err
    assert "holds smoke runs" in reproduce.claim_root(tmp_path, smoke=False)
    # run_one writes its record whole: the finished run is then skipped
    monkeypatch.setattr(reproduce, "command", lambda *a: [sys.executable, "-c", "pass"])
    (folder / "run.json").rmdir()
    args = reproduce.parser().parse_args(["fig_init_gain", "--smoke", "--out", str(tmp_path)])
    args.threads = 1
    assert reproduce.run_one(table, table.cells()[0], 0, args, [])["status"] == "ok"
    assert reproduce.finished(folder) and not list(folder.glob(".run.json.partial-*"))

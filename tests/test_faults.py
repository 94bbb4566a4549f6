"""The fault suite: what a multi-day run on a preemptible cluster meets (docs/faults.md, "When things
go wrong"). Each test reaches the case where the library's default behaviour differs from ours."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml

from pcn_ep.training.cli import main
from test_training import tiny_config

CKPT = ("checkpoints", "last.ckpt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """A failed assertion (a stop that never came) must not leave a training run behind."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()


def start(path, *extra, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "pcn_ep", "fit", "--config", str(path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    STARTED.append(proc)
    return proc


def slow_config(tmp_path, **cfg_trainer):
    """Long enough that a signal lands mid-epoch: 3 epochs of the whole digits split, K=12."""
    path, cfg = tiny_config(tmp_path, K=12, t_max=3, scheme="random")
    cfg["trainer"].update(max_epochs=3, limit_train_batches=None, **cfg_trainer)
    return write(path, cfg), cfg


TESTS_ON_PATH = {"PYTHONPATH": str(Path(__file__).parent)}  # signal_at.SignalAt for the runs


def signal_itself(cfg, signal_name, step, rank=None):
    """The run signals itself (``signal_at.SignalAt``) at training step ``step`` (on ``rank``)."""
    cfg["trainer"]["callbacks"].append({"class_path": "signal_at.SignalAt", "init_args": {
        "signal": signal_name, "at": "train", "step": step, "rank": rank}})


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. last.ckpt is the last state -------------------------------------------------------------
def test_last_ckpt_is_the_last_epoch_even_when_validation_does_not_improve(tmp_path):
    """A learning rate of 1e-12 leaves the validation error unchanged after epoch 0, so the
    monitored checkpoint is never refreshed (Lightning 2.6 then leaves save_last at epoch 0)."""
    path, cfg = tiny_config(tmp_path, lr=1e-12)
    cfg["trainer"]["max_epochs"] = 3
    fit = main(["fit", "--config", str(write(path, cfg))])
    assert fit == 0
    best = [p for p in (tmp_path / "checkpoints").glob("epoch*.ckpt")]
    assert len(best) == 1 and load(best[0])["epoch"] == 0  # validation never improved
    assert load(tmp_path.joinpath(*CKPT))["epoch"] == 2


# -- 2. diverged weights are never checkpointed -------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ep", "bp"])
def test_an_exploding_step_at_the_end_of_an_epoch_saves_nothing(tmp_path, algorithm):
    """One step per epoch, so the exploding step is the epoch's last: its weights are finite
    (~1e35) and only the check after that step stands between them and last.ckpt."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pcn_ep.core import MLP, DivergenceError
    from pcn_ep.training.callbacks import AtomicCheckpointIO
    from pcn_ep.training.module import PCNEPModule
    from test_reliability import Poisoned

    torch.manual_seed(0)
    module = PCNEPModule(MLP(6, 3, hidden=(8,)), algorithm=algorithm, K=2, lr=1e36)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/top1_error")])
    with pytest.raises(DivergenceError, match="epoch 0, step 1: the weights after the epoch's last"):
        trainer.fit(module, Poisoned(bad=[], batch_size=48))
    assert not list((tmp_path / "ck").glob("*.ckpt"))


def test_an_exploding_learning_rate_through_the_cli_is_one_line(tmp_path, capsys):
    path, cfg = tiny_config(tmp_path, lr=1e38)
    code = main(["fit", "--config", str(write(path, cfg))])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "diverged at epoch 0" in line, line
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_a_relaxation_that_runs_away_is_divergence(tmp_path, capsys):
    """The slow blow-up guard: finite states whose nudged energy outgrows beta x the free cost.
    With the bound at 1e-9 every step trips it; the message says what and how to change it."""
    path, _ = tiny_config(tmp_path, max_energy_ratio=1e-9)
    assert main(["fit", "--config", str(path)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "epoch 0, step 0" in line and "slow blow-up" in line and "max_energy_ratio" in line
    assert "in layer" in line and "nudged phase" in line  # where: the layer and the phase


# -- 3, 4, 5: signals, on one process and under DDP ---------------------------------------------
def test_a_second_signal_stops_a_huge_K_step_at_once(tmp_path):
    """The first signal lets the step end (so that the resume is exact); a step that would never
    end (K = 10^9) is stopped by a second signal, at once, with one line saying what is on disk."""
    path, cfg = tiny_config(tmp_path, K=10**9)
    cfg["trainer"]["max_epochs"] = 1
    marker = tmp_path / "first-signal-sent"
    cfg["trainer"]["callbacks"].insert(0, {"class_path": "signal_at.SignalAt", "init_args": {
        "signal": "SIGTERM", "at": "train", "step": 0, "marker": str(marker)}})
    proc = start(write(path, cfg), env={"PYTHONPATH": str(Path(__file__).parent)})
    deadline = time.time() + 300  # a bound for a broken run, not a timing the test relies on
    while not marker.exists():  # step 0 begins with the first signal pending
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "step 0 never began"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # lands inside the endless nudged phase
    _, err = proc.communicate(timeout=120)  # the step itself would never end
    assert proc.returncode == 143, err
    line = err.splitlines()[-1]
    assert line.startswith("pcn_ep: stopped at once by a second signal (SIGTERM; the first was SIGTERM)")
    assert line.endswith("no checkpoint on disk") and "Traceback" not in err
    assert not tmp_path.joinpath(*CKPT).exists()


def fake_slurm(tmp_path):
    """SLURM's variables and an ``scontrol`` that records how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_JOB_NAME": "pcn", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


@pytest.mark.parametrize("slurm", [False, True], ids=["plain", "slurm"])
def test_sigusr1_saves_last_ckpt_and_requeues_under_slurm(tmp_path, slurm):
    path, cfg = slow_config(tmp_path)
    signal_itself(cfg, "SIGUSR1", step=10)  # a known step: no timing, even on a busy machine
    write(path, cfg)
    env, log = fake_slurm(tmp_path) if slurm else ({}, None)
    proc = start(path, env={**env, **TESTS_ON_PATH})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGUSR1 after saving" in err.splitlines()[-1], err
    assert load(tmp_path.joinpath(*CKPT))["epoch"] < 2
    assert not list(tmp_path.rglob("hpc_ckpt*"))  # one checkpoint: last.ckpt
    if slurm:
        assert log.read_text().split() == ["requeue", "4242"]
        assert "SLURM job 4242 requeued" in err.splitlines()[-1]
    resumed = start(path, "--ckpt_path", "last", env={**env, **TESTS_ON_PATH})
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert load(tmp_path.joinpath(*CKPT))["epoch"] == 2


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_ddp_rank_stops_both_with_one_checkpoint(tmp_path, rank):
    path, cfg = slow_config(tmp_path, strategy="ddp", devices=2, accelerator="cpu")
    signal_itself(cfg, "SIGTERM", step=10, rank=rank)  # that rank only, at a known step
    write(path, cfg)
    proc = start(path, env={"OMP_NUM_THREADS": "1", **TESTS_ON_PATH})
    _, err = proc.communicate(timeout=300)  # a deadlock would hang here
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after saving" in err, err
    assert "Traceback" not in err, err
    saved = load(tmp_path.joinpath(*CKPT))
    assert saved["epoch"] < 2
    generators = saved["sign_generators"]
    assert len(generators) == 2 and not torch.equal(generators[0], generators[1])


def test_each_rank_takes_back_its_own_sign_generator():
    from pcn_ep.core import MLP
    from pcn_ep.training.module import PCNEPModule

    states = [torch.Generator().manual_seed(s).get_state() for s in (10, 11)]
    for rank in (0, 1):
        module = PCNEPModule(MLP(4, 3, hidden=(5,)), scheme="random")
        module._trainer = SimpleNamespace(global_rank=rank, state=SimpleNamespace(fn="fit"))
        module.on_load_checkpoint({"sign_generators": states})
        module.on_fit_start()  # the generator is made on the module's device, then restored
        assert torch.equal(module.signs.get_state(), states[rank])
        assert module.estimator.generator is module.signs


# -- 6, 7: bad inputs and impossible values -----------------------------------------------------
@pytest.mark.parametrize("case", ["truncated", "empty", "random bytes", "folder", "other network",
                                  "missing"])
def test_a_bad_checkpoint_path_is_one_line(tmp_path, capsys, case):
    path, cfg = tiny_config(tmp_path)
    cfg["trainer"]["max_epochs"] = 1
    assert main(["fit", "--config", str(write(path, cfg))]) == 0
    good = tmp_path.joinpath(*CKPT)
    bad = tmp_path / "bad.ckpt"
    overrides = []
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[:1000])
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "random bytes":
        bad.write_bytes(os.urandom(5000))
    elif case == "folder":
        bad = tmp_path / "checkpoints"
    elif case == "other network":
        bad = good
        overrides = ["--model.network.init_args.width_mult", "0.125"]
    else:
        bad = tmp_path / "nowhere.ckpt"
    before = good.read_bytes()
    capsys.readouterr()
    code = main(["fit", "--config", str(path), "--ckpt_path", str(bad), *overrides])
    line = one_error_line(capsys.readouterr().err)
    assert code != 0 and str(bad) in line, line
    assert good.read_bytes() == before


@pytest.mark.parametrize("case", ["width 0", "width negative", "max_epochs 0", "t_max 0",
                                  "t_max negative", "lr negative", "duplicate key", "channels"])
def test_impossible_values_are_errors(tmp_path, capsys, case):
    path, cfg = tiny_config(tmp_path)
    overrides, expect = {
        "width 0": (["--model.network.init_args.width_mult", "0"], "width_mult"),
        "width negative": (["--model.network.init_args.width_mult", "-1"], "width_mult"),
        "max_epochs 0": (["--trainer.max_epochs", "0"], "max_epochs"),
        "t_max 0": (["--model.t_max", "0"], "t_max"),
        "t_max negative": (["--model.t_max", "-3"], "t_max"),
        "lr negative": (["--model.lr", "-0.1"], "lr"),
        "duplicate key": ([], "duplicate key 'lr'"),
        "channels": (["--model.network.init_args.in_channels", "3"], "in_channels 3"),
    }[case]
    if case == "duplicate key":
        text = path.read_text()
        assert "\n  lr: 0.04\n" in text
        path.write_text(text.replace("\n  lr: 0.04\n", "\n  lr: 0.04\n  lr: 0.2\n"))
    code = main(["fit", "--config", str(path), *overrides])
    line = one_error_line(capsys.readouterr().err)
    assert code != 0 and expect in line, line
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_resuming_with_another_algorithm_or_beta_warns_once(tmp_path, capsys):
    path, cfg = tiny_config(tmp_path, algorithm="bp")
    cfg["trainer"]["max_epochs"] = 1
    assert main(["fit", "--config", str(write(path, cfg))]) == 0
    cfg["trainer"]["max_epochs"] = 2
    cfg["model"].update(algorithm="ep", beta=0.1)
    capsys.readouterr()
    assert main(["fit", "--config", str(write(path, cfg)), "--ckpt_path", "last"]) == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if l.startswith("pcn_ep: warning:")]
    assert len(warned) == 1 and "algorithm 'bp' -> 'ep', beta 0.02 -> 0.1" in warned[0], warned


# -- 8, 9: one writer per run folder, leftovers cleared, full disk -----------------------------
def test_a_second_run_in_the_same_folder_fails_naming_the_first(tmp_path):
    """The first run trains until it is stopped (1000 epochs), and the second starts once the
    first holds the folder's lock (the lock file names its PID): states, not seconds, so a busy
    machine cannot let the first finish before the second starts (the finding: exit 0)."""
    path, cfg = slow_config(tmp_path)
    cfg["trainer"]["max_epochs"] = 1000
    first = start(write(path, cfg))
    wait_for_lock(first, tmp_path / "checkpoints" / ".lock")
    second = start(path)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 1 and f"PID {first.pid}" in one_error_line(err), err
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=600)
    assert first.returncode == 143


def wait_for_lock(proc, lock, guard_s=600):
    """Until ``proc`` holds the run folder's lock: it writes its PID into the lock file once its
    flock is taken. ``guard_s`` only keeps a broken run from hanging the suite."""
    deadline = time.monotonic() + guard_s
    while not (lock.is_file() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{proc.pid} never took {lock}"
        time.sleep(0.05)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    path, cfg = tiny_config(tmp_path)
    cfg["trainer"]["max_epochs"] = 1
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".lock").write_text("999999")  # a PID file whose process (and flock) is gone
    assert main(["fit", "--config", str(write(path, cfg))]) == 0
    assert (folder / ".lock").read_text() == str(os.getpid())


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                                  small_disk):
    path, cfg = tiny_config(tmp_path)
    cfg["trainer"]["max_epochs"] = 1
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(small_disk)
    assert main(["fit", "--config", str(write(path, cfg))]) == 0
    before = (small_disk / "last.ckpt").read_bytes()
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill what is left
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    cfg["trainer"]["max_epochs"] = 2
    capsys.readouterr()
    code = main(["fit", "--config", str(write(path, cfg)), "--ckpt_path", "last"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "No space left on device" in line and str(small_disk) in line, line
    assert (small_disk / "last.ckpt").read_bytes() == before
    assert not list(small_disk.glob(".*partial*"))


def test_a_corrupt_image_met_mid_epoch_is_one_line_naming_it(tmp_path, capsys):
    """Found when a DataLoader worker reads it: the worker's traceback is not printed."""
    from images import image_folder

    folder = image_folder(tmp_path / "train", classes=2, per_class=3)
    jpeg = folder / "class_001" / "img_0001.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # a truncated download
    path, _ = tiny_config(tmp_path)
    code = main(["fit", "--config", str(path), "--data", "pcn_ep.data.ImageNetDataModule",
                 "--data.train_path", str(folder), "--data.val_path", str(folder),
                 "--data.backend", "folder", "--data.num_workers", "1", "--data.num_classes", "2",
                 "--data.image_size", "16", "--data.val_resize", "18", "--data.batch_size", "2",
                 "--model.network.init_args.in_channels", "3",
                 "--model.network.init_args.num_classes", "2"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"pcn_ep: error: cannot decode image {jpeg}: "), line

"""A new user's first hour (issue 18): help that explains, your own images in three overrides, a
quiet terminal, W&B runs that say how they ended, and a checkout the tests leave clean."""
from __future__ import annotations

import csv
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import docstring_parser
import pytest
import yaml

from images import image_folder
from pcn_ep.core import MLP, VGG5, VGG10, VGG10Skip
from pcn_ep.data import (DigitsDataModule, ImageDataModule, ImageFolderDataModule,
                         ImageNetDataModule, MnistSubsetDataModule, TensorDataModule)
from pcn_ep.training.cli import main
from pcn_ep.training.loggers import WandbLogger
from pcn_ep.training.module import PCNEPModule
from test_training import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "WANDB_MODE": "offline"}
ENV.pop("WANDB_SILENT", None)  # what a user's terminal shows


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pcn_ep", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=ENV)


# -- help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PCNEPModule, MLP, VGG5, VGG10, VGG10Skip, TensorDataModule,
                                 DigitsDataModule, MnistSubsetDataModule, ImageDataModule,
                                 ImageNetDataModule, ImageFolderDataModule])
def test_every_parameter_has_its_own_description(cls):
    """jsonargparse reads each ``fit`` argument's help from the Args block (Google style): one
    parameter per line, or ``K, rule, order, alpha: ...`` leaves four arguments blank. Like
    jsonargparse, follow ``__init__`` up the classes while it passes ``**kwargs`` on (or is
    inherited), taking each class's Args."""
    wanted, documented = [], {}
    for klass in cls.__mro__:
        args = docstring_parser.parse(klass.__doc__ or "").params
        documented = {p.arg_name: p.description for p in args} | documented
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        wanted += [p.name for p in parameters
                   if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if all(p.kind is not p.VAR_KEYWORD for p in parameters):
            break
    assert set(documented) == set(wanted), (set(wanted) - set(documented), set(documented) - set(wanted))
    assert all(documented[n] and len(documented[n]) > 10 for n in wanted)


def help_text(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["fit", *args, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def entry(text: str, flag: str) -> str:
    """The help of one option, its lines joined."""
    match = re.search(rf"^  {re.escape(flag)} .*?(?=^  --|\Z)", text, flags=re.M | re.S)
    return " ".join(match.group(0).split())


def test_fit_help_says_how_to_call_it_and_shows_the_configs_values(capsys):
    text = help_text(capsys, "--config", str(CONFIGS / "vgg5_cifar10_ce.yaml"))
    assert text.startswith("usage: python -m pcn_ep fit ")
    # the config's values (Table 7), not the class defaults (beta 0.05, K 10, lr 0.02)
    for flag, value in (("--model.beta", "0.02"), ("--model.K", "5"), ("--model.lr", "0.01"),
                        ("--trainer.max_epochs", "100")):
        assert f"default: {value})" in entry(text, flag), entry(text, flag)
    assert entry(text, "--model.cost").count("``") <= 4 and "perturbation" not in entry(text, "--model.cost")
    for flag in ("--model.beta", "--model.K", "--model.perturbation", "--model.rule",
                 "--model.order", "--model.alpha", "--network_from_data"):
        assert not entry(text, flag).split(" ", 2)[-1].startswith("(type:"), entry(text, flag)
    assert "--optimizer" not in text  # the module configures its own SGD; no option that ignores it
    quickstart = help_text(capsys)  # without --config: the embedded default's values
    assert "default: 0.04)" in entry(quickstart, "--model.lr")


def test_network_help_describes_each_argument(capsys):
    text = help_text(capsys, "--model.network.help", "VGG10")
    for name in ("in_channels", "num_classes", "input_size", "width_mult", "fc_width", "skips"):
        assert not entry(text, f"--model.network.{name}").split(" ", 2)[-1].startswith("(type:")


# -- your own images -----------------------------------------------------------------------------
def images(root: Path, classes: int = 3, gray: bool = False) -> Path:
    for split, count in (("train", 4), ("val", 2)):
        image_folder(root / split, classes=classes, per_class=count, size=24)
    if gray:
        from PIL import Image

        for path in root.rglob("*.*"):
            Image.open(path).convert("L").save(path)
    return root


QUICK = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
         "--data.init_args.batch_size", "6", "--data.init_args.num_workers", "0",
         "--model.network.init_args.width_mult", "0.0625"]


@pytest.mark.parametrize("network, gray", [("VGG5", False), ("VGG10", True)])
def test_the_readme_imagefolder_recipe_trains_with_three_overrides(tmp_path, monkeypatch, capsys,
                                                                   network, gray):
    """The recipe of docs/data.md ("Your own images"): root, image size and network; classes,
    channels and the network's input size come from the data, evaluation resizes with the image
    size, and output goes to runs/imagefolder/seed0 under the folder the command runs in (plus
    QUICK, to be fast)."""
    root = images(tmp_path / "my images", gray=gray)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.init_args.root",
                 "my images", "--data.init_args.image_size", "32", "--model.network", network,
                 *QUICK])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "imagefolder" / "seed0"
    saved = yaml.safe_load((run / "csv" / "config.yaml").read_text())  # one history: no version_N
    assert saved["model"]["network"]["class_path"] == f"pcn_ep.core.{network}"
    net = saved["model"]["network"]["init_args"]
    assert (net["num_classes"], net["in_channels"], net["input_size"]) == (3, 1 if gray else 3, 32)
    assert (run / "checkpoints" / "last.ckpt").exists() and root.exists()
    data = ImageFolderDataModule(str(root), image_size=32)
    assert data.val_resize == 37 and data.example_shape() == (1 if gray else 3, 32, 32)


@pytest.mark.parametrize("extra, message", [
    (["--data.init_args.image_size", "16", "--model.network", "VGG10"], "input_size 16 is too small"),
    (["--network_from_data", "false"], "the data has 3 classes but the network outputs 10"),
])
def test_an_imagefolder_mismatch_is_one_error_line_before_training(tmp_path, capsys, extra, message):
    root = images(tmp_path / "imgs")
    code = main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.init_args.root",
                 str(root), "--trainer.default_root_dir", str(tmp_path / "run"), *QUICK, *extra])
    errors = [l for l in capsys.readouterr().err.splitlines() if "error" in l.lower()]
    assert code == 1 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_imagefolder_root_without_train_and_val_says_what_it_needs(tmp_path):
    image_folder(tmp_path / "flat", classes=2, per_class=2)
    with pytest.raises(ValueError, match="must hold train/ and val/ folders"):
        ImageFolderDataModule(str(tmp_path / "flat"))


def test_evaluation_resize_follows_the_image_size(tmp_path):
    """The finding: image_size 32 kept val_resize 256, so evaluation cropped 32 px out of 256."""
    assert ImageNetDataModule("t", "v", image_size=224).val_resize == 256
    assert ImageNetDataModule("t", "v", image_size=32).val_resize == 37
    with pytest.raises(ValueError, match="val_resize 16 is smaller than image_size 32"):
        ImageNetDataModule("t", "v", image_size=32, val_resize=16)


# -- a quiet terminal, one error line, W&B runs that say how they ended ----------------------------
NOISE = ["litlogger", "LeafSpec", "anonymous setting", "Total Flops", "override existing callbacks",
         "weights_only", "wandb:", "Traceback"]


def test_a_run_prints_no_known_harmless_noise_and_one_training_error_column(tmp_path):
    done = run_cli("fit", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                   "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                   "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                   "--model.network.init_args.width_mult", "0.0625", cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert [l for l in out.splitlines() if any(n in l for n in NOISE)] == []
    assert "pcn_ep: done." in out and "W&B run folder: " in out
    run = tmp_path / "runs" / "quickstart" / "seed0"  # relative to where the command ran
    with open(run / "csv" / "metrics.csv") as f:  # pcn_ep's CSVLogger: one file per run folder
        header = next(csv.reader(f))
    assert "train/error" in header and not [h for h in header if h != "train/error" and "error" in h
                                            and h.startswith("train")]


def test_a_config_error_is_one_line_with_no_wandb_output_and_no_wandb_run(tmp_path, monkeypatch,
                                                                        capfd):
    """The finding: an error raised once the loggers exist was wrapped in W&B's lines and left
    an empty W&B run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    code = main(["fit", "--model.network.init_args.num_classes", "7"])
    out, err = capfd.readouterr()
    lines = [l for l in (out + err).splitlines()
             if l.strip() and not l.startswith(("Seed set", "GPU available", "TPU available"))]
    assert code == 1 and lines == [
        "pcn_ep: error: the data has 10 classes but the network outputs 7 (set "
        "model.network.init_args.num_classes)"], lines
    assert not list(tmp_path.rglob("offline-run-*"))


def wandb_summary(folder: Path) -> dict:
    """The summary records of the one W&B run under ``folder`` (read offline)."""
    from pcn_ep.experiments.report import _wandb_records

    runs = list(folder.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    summary = {}
    for record in _wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.summary.update})
    return summary


def wandb_config(tmp_path, **model):
    path, cfg = tiny_config(tmp_path, **model)
    cfg["trainer"]["logger"] = [{"class_path": "pcn_ep.training.loggers.WandbLogger",
                                 "init_args": {"save_dir": str(tmp_path), "project": "pcn-ep-test"}}]
    cfg["trainer"].update(max_epochs=1, limit_train_batches=2)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("model, code, status", [({}, 0, "ok"), ({"lr": 1e30}, 1, "diverged")])
def test_the_wandb_summary_holds_the_commands_own_status(tmp_path, capsys, model, code, status):
    """report.py reads ``run/status``: W&B's own exit code is 0 even for a failed run."""
    assert main(["fit", "--config", str(wandb_config(tmp_path, **model))]) == code
    assert wandb_summary(tmp_path)["run/status"] == status


def test_an_unexpected_failure_is_recorded_as_failed(tmp_path, monkeypatch):
    def boom(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(PCNEPModule, "on_train_epoch_end", boom, raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        main(["fit", "--config", str(wandb_config(tmp_path))])
    assert wandb_summary(tmp_path)["run/status"] == "failed"


# -- bench ---------------------------------------------------------------------------------------
def test_bench_prints_what_it_measured_in_human_units(capsys):
    from pcn_ep.tools import bench

    args = ["--width-mult", "0.0625", "--input-size", "16", "--batch-size", "2", "--steps", "1",
            "--K", "3", "--scheme", "random"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    for part in ("VGG5", "3×16×16", "batch 2", "random EP", "K 3", "cpu", "precision 32"):
        assert part in head, head
    assert re.search(r"step time +[\d.]+ ms +[\d.]+ ms", out) and out.count("GFLOP") == 2
    assert bench.main([*args, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {
        "ep_step_s", "bp_step_s", "time_ratio", "ep_flops", "bp_flops", "flop_ratio", "ep_kernels",
        "bp_kernels", "images_per_s", "mfu", "device"}


# -- checkout hygiene ----------------------------------------------------------------------------
def test_reproduce_resolves_relative_paths_from_where_it_runs(tmp_path, monkeypatch):
    """The finding: results and the configs' data roots were resolved from the checkout."""
    from pcn_ep.experiments import reproduce
    from pcn_ep.experiments.tables import TABLES

    monkeypatch.chdir(tmp_path)
    cells = [c for c in TABLES["table_costs"].cells() if c.config == "vgg5_mnist_mse.yaml"]
    assert reproduce.missing_data(cells, {}, {}) == {"mnist": "data/mnist"}
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    assert reproduce.missing_data(cells, {}, {}) == {}
    assert reproduce.main(["fig_init_gain", "--dry-run", "--gpus", "0"]) == 0
    assert (tmp_path / "results" / reproduce.MARKER).exists()


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_real_results_are_ignored_by_git_and_the_kept_reports_are_not():
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert ignored("results/table_costs/mnist/seed0/run.json") and ignored("results/report/x.md")
    assert ignored("results/smoke/table_costs/x/run.json") and ignored("runs/quickstart/seed0/x")
    assert not ignored("results/smoke/report/table_costs.md")
    assert not ignored("results/parity/parity.md")


WANDB_SERVICE_ELSEWHERE = """
import os, sys, wandb
from pcn_ep.training.loggers import WandbLogger
wandb.init(mode="offline", dir=os.getcwd(), settings=wandb.Settings(silent=True)).finish()
os.chdir(sys.argv[1])
logger = WandbLogger(save_dir="runs/x", offline=True)
logger.log_metrics({"loss": 1.0}, step=0)
print("a line of the run's console output")
logger.close("ok")
wandb.teardown()
"""


def test_wandb_writes_where_the_command_runs_even_if_its_service_started_elsewhere(tmp_path):
    """W&B's service process keeps the working directory it started in, and child processes reuse
    it (WANDB_SERVICE): given a relative folder, it wrote the run's console log (output.log) there,
    into the checkout in the test suite, and the run folder was split in two. In a process of its
    own: W&B captures the console by patching the ``sys.stdout`` it first sees, and pytest's
    capture of an earlier test swaps that object (output.log was then missing, whatever the fix)."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    done = subprocess.run([sys.executable, "-c", WANDB_SERVICE_ELSEWHERE, str(second)], cwd=first,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    logs = list(second.glob("runs/x/wandb/offline-run-*/files/output.log"))
    assert logs and "a line of the run's console output" in logs[0].read_text()
    assert not (first / "runs").exists()

"""The reproduce runner, the Fig. 8 energy tool and the report: grids, records, W&B, tables, errors."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pcn_ep.experiments import report, reproduce, tables
from pcn_ep.training.cli import main as cli_main
from pcn_ep.core import VGG5, Dynamics
from pcn_ep.tools.energy import energy_curves

from helpers import batch


def test_paper_results_match_the_tables_and_every_cell_has_a_config():
    paper = report.paper_results()
    assert set(paper) == set(tables.TABLES)
    for name, table in tables.TABLES.items():
        cells = table.cells()
        assert len({c.name for c in cells}) == len(cells), f"{name}: duplicate cells"
        for cell in cells:
            assert (reproduce.CONFIGS / cell.config).is_file(), cell.config
        for row in paper[name].get("rows", []):
            assert any(report._matches(row, c.labels) for c in cells), f"{name}: {row} has no cell"
    # Table 1 is the 16 cells of the paper's table, each with the paper's numbers beside it.
    assert len(paper["table_costs"]["rows"]) == len(tables.TABLES["table_costs"].cells()) == 16


@pytest.mark.parametrize("smoke", [False, True])
def test_cell_commands_parse_and_carry_their_overrides(tmp_path, capsys, smoke):
    """The first and last cell of every training table, through the real CLI (--print_config)."""
    args = reproduce.parser().parse_args(["table_costs", "--wandb-project", "p"] + ["--smoke"] * smoke)
    args.data_root, args.set = {"cifar100": str(tmp_path)}, {"trainer.max_epochs": "3"}
    for table in tables.TABLES.values():
        for cell in [c for c in table.cells() if c.command == "fit"][:: max(1, len(table.cells()) - 1)]:
            (tmp_path / table.name).mkdir(exist_ok=True)
            cmd = reproduce.command(table, cell, 7, tmp_path / table.name, args, devices=0)
            with pytest.raises(SystemExit):
                cli_main(cmd[cmd.index("fit"):] + ["--print_config"])
            config = yaml.safe_load(capsys.readouterr().out)
            assert config["seed_everything"] == 7 and config["model"]["seed"] == 7
            assert config["trainer"]["max_epochs"] == 3   # --set wins over everything
            for key, value in cell.overrides.items():
                node = config
                for part in key.split("."):
                    node = node[part]
                assert node == value, (table.name, key)
            # The config's own callbacks: its checkpoint metric, the gradient-fidelity monitor.
            own = yaml.safe_load((reproduce.CONFIGS / cell.config).read_text())["trainer"]["callbacks"]
            callbacks = config["trainer"]["callbacks"]
            assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in own]
            assert callbacks[0]["init_args"]["dirpath"] == str(tmp_path / table.name / "checkpoints")
            assert callbacks[0]["init_args"]["monitor"] == own[0]["init_args"]["monitor"]
            wandb = config["trainer"]["logger"][1]["init_args"]
            assert wandb["group"] == table.name and wandb["project"] == "p"
            assert wandb["config"]["cell"] == cell.labels
            data = config["data"]
            if smoke:
                assert data["class_path"].endswith("DigitsDataModule")
            elif data["init_args"].get("dataset") == "cifar100":
                assert data["init_args"]["root"] == str(tmp_path)


def test_gpu_runs_use_one_gpu_each_or_all_of_them_in_ddp(tmp_path):
    assert reproduce.gpu_slots(4, ddp=False) == [[0], [1], [2], [3]]
    assert reproduce.gpu_slots(4, ddp=True) == [[0, 1, 2, 3]]
    assert reproduce.gpu_slots(0, ddp=True) == []
    args = reproduce.parser().parse_args(["table_top5"])
    args.data_root, args.set = {"imagenet": "/data/ffcv"}, {}
    table = tables.TABLES["table_top5"]
    cmd = reproduce.command(table, table.cells()[0], 0, tmp_path, args, devices=4)
    for flag in ("--trainer.devices=4", "--trainer.strategy=ddp", "--trainer.accelerator=gpu",
                 "--data.init_args.train_path=/data/ffcv/train.beton",
                 "--data.init_args.val_path=/data/ffcv/val.beton"):
        assert flag in cmd


def test_dry_run_prints_every_command_and_runs_none(tmp_path, capsys):
    assert reproduce.main(["table_top5", "--dry-run", "--gpus", "8", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all("--trainer.devices=8 --trainer.strategy=ddp" in l for l in lines)
    assert reproduce.main(["table_costs", "--dry-run", "--gpus", "0", "--out", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 48  # 16 cells x 3 seeds
    assert not list(tmp_path.rglob("run.json"))


def test_smoke_sweep_records_logs_resumes_and_reports(tmp_path):
    """fig_init_gain --smoke end to end: 4 runs, local records == W&B records, report, rerun skips."""
    cmd = [sys.executable, "-m", "pcn_ep", "reproduce", "fig_init_gain", "--smoke", "--out",
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = sorted((tmp_path / "fig_init_gain").rglob("run.json"))
    assert len(records) == 4
    for path in records:
        local = report.read_record(path)
        assert local.status == "ok" and 0 <= local.final["test/top1_error"] <= 1
        assert sorted(local.curves["val/top1_error"]) == [0, 1]   # 2 smoke epochs
        wandb_run = report.read_wandb_run(next(path.parent.glob("wandb/offline-run-*")))
        assert wandb_run.table == "fig_init_gain" and wandb_run.labels == local.labels
        # ok only where the CLI wrote its status into the summary: W&B's exit code is not the run's
        assert wandb_run.status in ("ok", "unknown")
        assert wandb_run.final == pytest.approx(local.final, rel=1e-6)
        assert wandb_run.curves["val/top1_error"] == pytest.approx(local.curves["val/top1_error"])
    md = (tmp_path / "report" / "fig_init_gain.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 0.2") or line.startswith("| 1.0")]
    assert len(rows) == 4 and all(" ok " in r for r in rows)
    assert (tmp_path / "report" / "fig_init_gain.png").stat().st_size > 10_000
    before = [p.read_text() for p in records]
    again = subprocess.run(cmd + ["--no-report"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and [p.read_text() for p in records] == before  # finished: skipped
    # The W&B folders alone give the same table (the report reads either source).
    for path in records:
        path.unlink()
    assert report.write_report(tmp_path, tmp_path / "from_wandb", ["fig_init_gain"])
    from_wandb = (tmp_path / "from_wandb" / "fig_init_gain.md").read_text()
    assert from_wandb.count(" ok ") + from_wandb.count(" unknown ") == 4
    # --publish without a W&B key: the W&B Report's specification, its run set selecting these
    # runs as their own W&B files name them (group, smoke flag).
    published = subprocess.run(
        [sys.executable, "-m", "pcn_ep", "report", str(tmp_path), "--out", str(tmp_path / "pub"),
         "--publish"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"})
    assert published.returncode == 0, published.stderr[-2000:]
    (section,) = json.loads((tmp_path / "pub" / "wandb_report.json").read_text())["sections"]
    assert section["runset"]["filters"] == \
        f"Metric(\"Group\") == '{wandb_run.table}' and Config(\"smoke\") == {wandb_run.smoke}"


def test_diverged_runs_are_results_marked_nan(tmp_path):
    """A learning rate of 1e6 blows every run up: each is recorded as diverged (not a failure),
    the sweep goes on and exits 0, and the table marks the cells NaN (as Fig. 5 does)."""
    done = subprocess.run(
        [sys.executable, "-m", "pcn_ep", "reproduce", "fig_init_gain", "--smoke", "--out",
         str(tmp_path), "--set", "model.lr=1e6"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("run.json")]
    assert len(records) == 4 and {r["status"] for r in records} == {"diverged"}
    assert all("training diverged at epoch" in r["error"] for r in records)
    md = (tmp_path / "report" / "fig_init_gain.md").read_text()
    assert md.count("| diverged | NaN | NaN |") == 4


def test_energy_tool_traces_a_checkpoint_and_names_a_missing_one(tmp_path):
    smoke = [str(reproduce.CONFIGS / "vgg5_cifar100_mse.yaml"), str(reproduce.CONFIGS / "smoke.yaml")]
    fit = subprocess.run(
        [sys.executable, "-m", "pcn_ep", "fit", "--config", smoke[0], "--config", smoke[1],
         "--trainer.max_epochs=1", "--test_after_fit=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)  # writes runs/ in tmp_path
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    outputs = {}
    for name, extra in (("init", []), ("trained", ["--ckpt", str(ckpt)])):
        cmd = [sys.executable, "-m", "pcn_ep", "energy", "--config", smoke[0], "--config", smoke[1],
               "--K-max", "6", "--out", str(tmp_path / f"{name}.json"), *extra]
        assert subprocess.run(cmd, capture_output=True, timeout=300, cwd=tmp_path).returncode == 0
        outputs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert outputs["trained"]["checkpoint"] == str(ckpt) and outputs["init"]["checkpoint"] is None
    assert len(outputs["trained"]["curves"]["pgd/-"]["mean"]) == 7
    # Trained weights give other free-state costs, hence another F(K=0) = βC.
    assert outputs["trained"]["curves"]["mod-pgd/+"]["mean"][0] != \
        outputs["init"]["curves"]["mod-pgd/+"]["mean"][0]
    missing = subprocess.run([sys.executable, "-m", "pcn_ep", "energy", "--config", smoke[0],
                              "--config", smoke[1], "--ckpt", str(tmp_path / "no.ckpt"), "--out",
                              str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)  # the config's loggers make runs/ where they start
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr


def test_a_failing_run_stops_the_sweep_with_its_error(tmp_path):
    """Data folders that exist but hold no data: the first run fails, the sweep stops, exit 1."""
    empty = tmp_path / "empty"
    empty.mkdir()
    roots = [a for name in ("mnist", "cifar10", "cifar100", "imagenet32")
             for a in ("--data-root", f"{name}={empty}")]
    done = subprocess.run(
        [sys.executable, "-m", "pcn_ep", "reproduce", "table_costs", "--gpus", "0", "--out",
         "out", *roots], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1
    assert "failed" in done.stderr and str(empty) in done.stderr
    assert len(list((tmp_path / "out").rglob("run.json"))) == 1  # --out relative to the caller
    bad = subprocess.run([sys.executable, "-m", "pcn_ep", "reproduce", "table_costs",
                          "--data-root", f"mnist={tmp_path / 'nowhere'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--data-root mnist" in bad.stderr


def _record(folder, table, labels, seed, status, top1=None, epochs=()):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(
        {"table": table, "cell": labels, "seed": seed, "status": status}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "val/top1_error", "test/top1_error"])
        writer.writeheader()
        for epoch, value in epochs:
            writer.writerow({"epoch": epoch, "val/top1_error": value})
        if top1 is not None:
            writer.writerow({"epoch": len(epochs), "test/top1_error": top1})


def test_report_puts_the_papers_numbers_beside_ours_and_marks_divergence(tmp_path):
    labels = {"dataset": "mnist", "cost": "mse", "method": "ep"}
    _record(tmp_path / "a", "table_costs", labels, 0, "ok", 0.0030, [(0, 0.1), (1, 0.05)])
    _record(tmp_path / "b", "table_costs", labels, 1, "ok", 0.0040, [(0, 0.2), (1, 0.07)])
    _record(tmp_path / "c", "table_costs", {**labels, "cost": "ce"}, 0, "diverged")
    paths = report.write_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "table_costs.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mnist | mse | ep"))
    assert "| 2 | ok | 0.35 ± 0.07 |" in row and row.endswith("| 0.32 ± 0.01 | n/a |")
    diverged = next(line for line in md.splitlines() if line.startswith("| mnist | ce | ep"))
    assert "NaN" in diverged and "0.45 ± 0.01" in diverged
    assert tmp_path / "out" / "table_costs.png" in paths
    runs = [r for r in report.read_runs(tmp_path) if r.seed == 0 and r.status == "ok"]
    assert runs[0].curves["val/top1_error"] == {0: 0.1, 1: 0.05}


def test_report_errors_name_the_problem(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "pcn_ep", "report", str(tmp_path / "x"),
                              "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert missing.returncode == 1 and "results folder not found" in missing.stderr
    empty = subprocess.run([sys.executable, "-m", "pcn_ep", "report", str(tmp_path), "--out",
                            str(tmp_path / "o")], capture_output=True, text=True)
    assert empty.returncode == 1 and "no runs" in empty.stderr


def test_energy_curves_start_at_beta_times_the_free_cost():
    """At K = 0 the state is the free one: E = 0, so F = βC(h*); a nudge moves F off it."""
    torch.manual_seed(0)
    net = VGG5(in_channels=1, num_classes=10, input_size=16, width_mult=0.0625).double()
    x, y = batch((4, 1, 16, 16), 10)
    curves = energy_curves(net, x, y, "ce", 0.05, Dynamics(8, "mod-pgd", "async", 1.0))
    assert set(curves) == {"mod-pgd/+", "mod-pgd/-", "pgd/+", "pgd/-"}
    cost = torch.nn.functional.cross_entropy(net(x), y, reduction="none")
    for name, c in curves.items():
        sign = 1 if name.endswith("+") else -1
        assert len(c["mean"]) == 9 and len(c["per_image"]) == 4
        assert torch.allclose(torch.tensor([f[0] for f in c["per_image"]], dtype=torch.float64),
                              sign * 0.05 * cost, atol=1e-12)
        assert not math.isclose(c["mean"][-1], c["mean"][0], abs_tol=1e-9)


def test_energy_curves_follow_the_configs_pool_routing():
    """On an image with flat regions (tied max-pool windows) the two routings relax differently;
    the energy tool traces the one the training config uses."""
    torch.manual_seed(0)
    net = VGG5(in_channels=1, num_classes=10, input_size=16, width_mult=0.0625).double()
    x = torch.zeros(4, 1, 16, 16, dtype=torch.float64)
    x[:, :, 5:11, 5:11] = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(4)
    traced = {routing: energy_curves(net, x, y, "ce", 0.05, Dynamics(6, "mod-pgd", "async", 1.0),
                                     routing)["mod-pgd/+"]["mean"]
              for routing in ("free", "nudged")}
    assert traced["free"][0] == traced["nudged"][0]          # the same free state
    assert traced["free"][-1] != pytest.approx(traced["nudged"][-1], rel=1e-9, abs=0)


def test_energy_curves_of_a_batchnorm_network_run_each_sign_alone():
    """A BatchNorm layer couples a batch: the +β copy's curve is its own nudged phase, not one
    pooled with the −β copy (the tool once stacked [x; x], pooling the statistics)."""
    from pcn_ep.core import ResNetPCN, get_cost, nudged_phase

    torch.manual_seed(0)
    net = ResNetPCN(in_channels=1, num_classes=3, input_size=8, width_mult=1 / 16, blocks=(1,),
                    norm="batch").double()
    x, y = batch((6, 1, 8, 8), 3)
    dynamics = Dynamics(6, "mod-pgd", "async", 1.0)
    curves = energy_curves(net, x, y, "ce", 0.5, dynamics)
    with torch.no_grad():
        alone = nudged_phase(net, net.free_phase(x), y, torch.full((6,), 0.5, dtype=torch.float64),
                             get_cost("ce"), dynamics, trace=True)
    f = torch.stack([e + 0.5 * c for e, c in alone.trace])
    assert torch.allclose(torch.tensor(curves["mod-pgd/+"]["mean"], dtype=torch.float64), f.mean(1))

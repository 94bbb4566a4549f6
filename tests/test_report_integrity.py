"""Reports that cannot mislead (issue 16): smoke and real runs never mix, a run's status is its own
exit (never the W&B logger's), dry runs target GPUs and survive a closed pipe, missing data fails
before the first run, and the figures read as the paper's (titles, words, ticks, paper numbers)."""
import csv
import json
import math
import subprocess
import sys
import time

import pytest

from pcn_ep.experiments import report, reproduce, tables

COSTS = {"dataset": "mnist", "cost": "mse", "method": "ep"}


def _record(folder, table, labels, seed, status, top1=None, epochs=(), smoke=False, fidelity=()):
    """A run folder as ``reproduce`` leaves it: run.json and Lightning's metrics.csv (``fidelity``:
    (epoch, min cosine, max relative error) rows, as the GradientFidelity callback logs them)."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(
        {"table": table, "cell": labels, "seed": seed, "status": status, "smoke": smoke}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "val/top1_error", "train/error", "test/top1_error",
                                    "fidelity/min_cosine", "fidelity/max_rel_err"])
        writer.writeheader()
        writer.writerows({"epoch": e, "fidelity/min_cosine": c, "fidelity/max_rel_err": r}
                         for e, c, r in fidelity)
        for epoch, value in epochs:
            writer.writerow({"epoch": epoch, "val/top1_error": value, "train/error": value / 2})
        if top1 is not None:
            writer.writerow({"epoch": len(epochs), "test/top1_error": top1})


def _row(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


# -- smoke and real never mix ------------------------------------------------------------------
def test_a_real_report_never_reads_the_smoke_runs_inside_its_folder(tmp_path):
    """The finding: results/smoke/ sits inside results/; a real failed run and three smoke runs
    came out as one cell '4 | failed,ok | 38.61 ± 11.64' under a smoke banner."""
    root = tmp_path / "results"
    cell = "dataset=mnist__cost=mse__method=ep"   # reproduce's folder for the cell
    for seed, top1 in enumerate((0.30, 0.45, 0.50)):
        _record(root / "smoke" / "table_costs" / cell / f"seed{seed}", "table_costs", COSTS, seed,
                "ok", top1, [(0, 0.6), (1, top1)], smoke=True)
    _record(root / "table_costs" / cell / "seed0", "table_costs", COSTS, 0, "failed")
    report.write_report(root, tmp_path / "real")
    md = (tmp_path / "real" / "table_costs.md").read_text()
    assert report.SMOKE_BANNER not in md and "Left out: 3 smoke run" in md
    assert "| mnist | mse | ep | 1 | failed |  |" in _row(md, "| mnist | mse | ep")
    # The smoke folder reports its own runs, marked smoke.
    report.write_report(root / "smoke", tmp_path / "smoke")
    md = (tmp_path / "smoke" / "table_costs.md").read_text()
    assert report.SMOKE_BANNER in md and "| 3 | ok | 41.67 ± 10.41 |" in md


def test_a_folder_that_is_a_results_root_of_its_own_is_not_read(tmp_path):
    """reproduce marks each results root; a marked root inside another is not the outer one's."""
    root = tmp_path / "results"
    assert reproduce.claim_root(root / "smoke", smoke=True) is None
    assert reproduce.claim_root(root, smoke=False) is None
    _record(root / "smoke" / "table_costs" / "c" / "seed0", "table_costs", COSTS, 0, "ok", 0.3,
            smoke=False)   # even if its record does not say smoke
    _record(root / "table_costs" / "c" / "seed0", "table_costs", COSTS, 0, "ok", 0.004)
    assert [r.final["test/top1_error"] for r in report.read_runs(root)] == [0.004]


def test_reproduce_refuses_to_put_smoke_runs_into_a_real_root_and_back(tmp_path, capsys):
    assert reproduce.claim_root(tmp_path / "real", smoke=False) is None
    assert "holds real runs" in reproduce.claim_root(tmp_path / "real", smoke=True)
    assert reproduce.claim_root(tmp_path / "real", smoke=False) is None   # same kind: fine
    # An unmarked folder from before the marker: its records say what it holds.
    _record(tmp_path / "old" / "table_costs" / "c" / "seed0", "table_costs", COSTS, 0, "ok", smoke=True)
    assert "holds smoke runs" in reproduce.claim_root(tmp_path / "old", smoke=False)
    code = reproduce.main(["table_costs", "--smoke", "--dry-run", "--out", str(tmp_path / "real")])
    assert code == 2 and "holds real runs" in capsys.readouterr().err


def test_a_smoke_root_mixed_with_real_runs_reports_one_kind_and_says_so(tmp_path):
    """No marker, both kinds in one folder: the real runs are reported, the smoke ones counted."""
    _record(tmp_path / "a", "table_costs", COSTS, 0, "ok", 0.0040, smoke=False)
    _record(tmp_path / "b", "table_costs", COSTS, 1, "ok", 0.40, smoke=True)
    report.write_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "table_costs.md").read_text()
    assert "| 1 | ok | 0.40 |" in _row(md, "| mnist | mse | ep") and "Left out: 1 smoke run" in md
    report.write_report(tmp_path, tmp_path / "smoke_out", smoke=True)
    assert report.SMOKE_BANNER in (tmp_path / "smoke_out" / "table_costs.md").read_text()


# -- status from the run's own exit ---------------------------------------------------------------
def _wandb_folder(tmp_path, monkeypatch, exit_code=0, summary_status=None, history=()):
    """A W&B run folder whose .wandb file holds these records (run, history, summary, exit)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    run = pb.Record()
    run.run.run_group = "fig_init_gain"
    for key, value in {"table": "fig_init_gain", "cell": {"output_gain": 0.2, "method": "ep"},
                       "seed": 0}.items():
        item = run.run.config.update.add()
        item.key, item.value_json = key, json.dumps(value)
    records.append(run)
    for row in history:
        rec = pb.Record()
        for key, value in row.items():
            item = rec.history.item.add()
            item.key, item.value_json = key, json.dumps(value)
        records.append(rec)
    if summary_status:
        rec = pb.Record()
        item = rec.summary.update.add()
        item.key, item.value_json = "run/status", json.dumps(summary_status)
        records.append(rec)
    if exit_code is not None:
        rec = pb.Record()
        rec.exit.exit_code = exit_code
        records.append(rec)
    folder = tmp_path / "fig_init_gain" / "cell" / "seed0" / "wandb" / "offline-run-x"
    folder.mkdir(parents=True)
    (folder / "run-x.wandb").write_bytes(b"")
    monkeypatch.setattr(report, "_wandb_records", lambda path: iter(records))
    return folder


def test_a_wandb_folder_alone_with_exit_code_0_is_not_ok(tmp_path, monkeypatch):
    """The finding: a run that failed its config check (exit 1) still closed W&B with exit code 0,
    and the report read '| ep | 0.2 | 1 | ok | | |'."""
    folder = _wandb_folder(tmp_path, monkeypatch, exit_code=0)
    assert report.read_wandb_run(folder).status == "unknown"
    report.write_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "fig_init_gain.md").read_text()
    row = _row(md, "| 0.2 | ep")
    assert "| unknown |" in row and " ok " not in row
    assert "not the run's" in md   # the reader is told why


@pytest.mark.parametrize("exit_code,summary,expected", [
    (0, "ok", "ok"), (0, "diverged", "diverged"), (0, "failed", "failed"), (1, None, "failed"),
    (None, None, "running"), (None, "ok", "ok")])
def test_a_wandb_runs_status_is_the_one_the_cli_wrote(tmp_path, monkeypatch, exit_code, summary,
                                                      expected):
    folder = _wandb_folder(tmp_path, monkeypatch, exit_code, summary)
    assert report.read_wandb_run(folder).status == expected


def test_only_runs_that_ended_ok_give_numbers(tmp_path, monkeypatch):
    """Test metrics in a W&B folder whose run's end is unknown are not a result."""
    _wandb_folder(tmp_path, monkeypatch, 0, None, [{"test/top1_error": 0.5}])
    report.write_report(tmp_path, tmp_path / "out")
    assert "| 0.2 | ep | 1 | unknown |  |  |" in (tmp_path / "out" / "fig_init_gain.md").read_text()


# -- dry run --------------------------------------------------------------------------------------
def test_dry_run_targets_gpus_even_on_a_host_without_any(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert reproduce.main(["table_top5", "--dry-run", "--out", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert all("--trainer.accelerator=gpu --trainer.devices=-1 --trainer.strategy=ddp" in l
               for l in lines)
    assert reproduce.main(["table_costs", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 48 and all("--trainer.accelerator=gpu --trainer.devices=1" in l
                                    and "strategy" not in l for l in lines)
    # --gpus 0: CPU commands.
    assert reproduce.main(["table_top5", "--dry-run", "--gpus", "0", "--out", str(tmp_path / "c")]) == 0
    assert all("--trainer.accelerator=cpu --trainer.devices=1" in l
               for l in capsys.readouterr().out.splitlines())


def test_dry_run_into_a_closed_pipe_exits_quietly(tmp_path):
    """`--dry-run | head -1`: no BrokenPipeError traceback, exit 0 (enough lines to fill the pipe)."""
    seeds = " ".join(map(str, range(40)))   # 640 commands, far beyond a pipe's 64 KiB
    done = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m pcn_ep reproduce table_costs --dry-run --gpus 0 "
                       f"--seeds {seeds} --out {tmp_path} | head -1; echo rc=${{PIPESTATUS[0]}}"],
        capture_output=True, text=True, timeout=300)
    assert done.stdout.count("pcn_ep fit") == 1 and "rc=0" in done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_print_commands_stops_quietly_when_the_reader_goes(monkeypatch):
    class ClosedAfterOne:
        written = []

        def write(self, text):
            if self.written:
                raise BrokenPipeError
            self.written.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedAfterOne())
    assert reproduce.print_commands(f"cmd {i}" for i in range(5)) == 0
    assert ClosedAfterOne.written == ["cmd 0"]


# -- missing data ---------------------------------------------------------------------------------
def test_missing_data_fails_before_the_first_run_naming_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # relative data roots are read from here: no data/ there
    monkeypatch.setattr(reproduce, "run_one", lambda *a: pytest.fail("a run started"))
    start = time.time()
    assert reproduce.main(["table_costs", "--gpus", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert time.time() - start < 10
    for name in ("mnist", "cifar10", "cifar100", "imagenet32"):
        assert f"--data-root {name}=PATH" in err and f"data/{name} not found" in err
    assert not list(tmp_path.rglob("run.json"))
    # Only what is missing is named; ImageNet asks for the folder of its .beton files.
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    missing = reproduce.missing_data(tables.TABLES["table_costs"].cells(),
                                     {"cifar10": str(tmp_path)}, {})
    assert set(missing) == {"cifar100", "imagenet32"}
    assert reproduce.main(["table_top5", "--gpus", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--data-root imagenet=DIR" in capsys.readouterr().err


# -- figures ----------------------------------------------------------------------------------------
def _texts(fig) -> str:
    """The figure's own texts, a wrapped line read as one."""
    return " ".join(t.get_text().replace("\n", " ") for t in fig.texts) + " " + (
        fig._suptitle.get_text() if fig._suptitle else "")


def _curves_root(tmp_path, table, cells, smoke=False, epochs=2):
    """Two epochs, as a smoke run: matplotlib's default ticks would read 1.0, 1.2, …"""
    for i, labels in enumerate(cells):
        for seed in (0, 1):
            _record(tmp_path / table / str(i) / f"seed{seed}", table, labels, seed, "ok",
                    0.3 + 0.01 * i, [(e, 0.6 - 0.05 * e) for e in range(epochs)], smoke=smoke)
    runs = report.read_runs(tmp_path)
    return runs, report.summarize(runs)


def test_curve_figures_read_as_the_papers(tmp_path):
    cells = [c.labels for c in tables.TABLES["table_costs"].cells()]
    runs, cells = _curves_root(tmp_path, "table_costs", cells)
    fig = report.build_figure("table_costs", runs, cells)
    assert tables.TABLES["table_costs"].title in _texts(fig)     # not 'table_costs'
    width, height = fig.get_size_inches()
    assert width / height < 2                                    # not a 2640×495 strip
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4
    for ax in axes:
        assert ax.get_xlabel() == "Epoch" and ax.get_ylabel() == "Validation top-1 error (%)"
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks), ticks
        # The paper's final test error of each cell is drawn (dotted), ours as a marker.
        dotted = [l for l in ax.lines if l.get_linestyle() == ":"]
        assert len(dotted) == 4
    # One legend below the panels, in a readable size, naming every cell and both markers.
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
    assert "cost=mse, method=ep" in texts and "the paper's final test error" in texts
    mnist = next(ax for ax in axes if "mnist" in ax.get_title())
    assert sorted(round(l.get_ydata()[0], 2) for l in mnist.lines if l.get_linestyle() == ":") == \
        [0.32, 0.33, 0.45, 0.48]
    assert "SMOKE" not in _texts(fig)


def test_a_smoke_figure_says_so_on_the_png(tmp_path):
    runs, cells = _curves_root(tmp_path, "fig_init_gain",
                               [c.labels for c in tables.TABLES["fig_init_gain"].cells()], smoke=True)
    fig = report.build_figure("fig_init_gain", runs, cells, smoke=True)
    assert report.SMOKE_BANNER in _texts(fig)
    assert "fig_init_gain" not in _texts(fig) and "Fig. 3" in _texts(fig)


def test_the_markdown_and_the_png_name_the_same_metrics(tmp_path):
    """Fig. 4: the PNG plotted validation error while its Markdown said test error."""
    labels = [c.labels for c in tables.TABLES["fig_batch_size"].cells()]
    runs, cells = _curves_root(tmp_path, "fig_batch_size", labels)
    fig = report.build_figure("fig_batch_size", runs, cells)
    md = report.markdown("fig_batch_size", runs, cells, report.paper_results())
    for ax in fig.axes:
        assert ax.get_ylabel().lower() in md.lower()        # validation top-1, training error
    assert report.caption("fig_batch_size", report.paper_results()) in _texts(fig)


def test_figures_keep_a_sane_shape_and_write_a_legible_png(tmp_path):
    from PIL import Image

    cells = [c.labels for c in tables.TABLES["table_costs"].cells()]
    _curves_root(tmp_path, "table_costs", cells)
    report.write_report(tmp_path, tmp_path / "out")
    width, height = Image.open(tmp_path / "out" / "table_costs.png").size
    assert width / height < 2 and height >= 600
    heat = [c.labels for c in tables.TABLES["table_beta_K"].cells()]
    runs, cells = _curves_root(tmp_path / "bk", "table_beta_K", heat)
    fig = report.build_figure("table_beta_K", runs, cells)
    assert fig.axes[0].get_xlabel() == "K (nudge iterations)"
    assert fig.axes[0].get_ylabel() == "β (nudge strength)"
    assert not math.isnan(float(fig.axes[0].texts[0].get_text()))


def test_the_fidelity_monitor_gets_its_own_figure_and_table_for_ep_cells(tmp_path):
    """Issue 17: the GradientFidelity callback's worst cosine and relative error per epoch, one
    line per EP cell (BP logs none), drawn as logged (not in %), and in the Markdown."""
    root = tmp_path / "results"
    checks = [(0, 0.99, 0.1), (0, 0.97, 0.3), (1, 0.9, 0.5)]   # two in epoch 0, one in epoch 1
    for method, logged in (("ep", checks), ("bp", ())):
        _record(root / method, "fig_batch_size", {"batch_size": 16, "method": method}, 0, "ok",
                0.3, [(0, 0.5), (1, 0.4)], fidelity=logged)
    runs = report.read_runs(root)
    cells = report.summarize(runs)
    fig = report.build_fidelity_figure("fig_batch_size", runs, cells)
    cosine, rel_err = fig.axes
    assert cosine.get_ylabel() == report.words("fidelity/min_cosine") != "fidelity/min_cosine"
    assert [list(line.get_ydata()) for line in cosine.lines] == [pytest.approx([0.98, 0.9])]
    assert [list(line.get_ydata()) for line in rel_err.lines] == [pytest.approx([0.2, 0.5])]
    assert "gradient fidelity" in _texts(fig)
    written = report.write_report(root, tmp_path / "out")
    assert tmp_path / "out" / "fig_batch_size_fidelity.png" in written
    md = (tmp_path / "out" / "fig_batch_size.md").read_text()
    assert _row(md, "| batch_size=16, method=ep |").endswith("| 0.9800 | 0.9000 | 0.2000 | 0.5000 |")
    assert "batch_size=16, method=bp" not in md.split("Gradient fidelity")[1]
    # A table whose runs never logged the monitor gets no fidelity figure or section.
    _curves_root(tmp_path / "plain", "table_costs", [COSTS])
    written = report.write_report(tmp_path / "plain", tmp_path / "plain_out")
    assert not any("fidelity" in p.name for p in written)
    assert "Gradient fidelity" not in (tmp_path / "plain_out" / "table_costs.md").read_text()


def test_nothing_on_a_smoke_figure_is_cut_off_and_one_epoch_fidelity_is_a_dot_per_cell(tmp_path):
    """Found in the smoke report: the banner ran past a one-heat-map figure's edges, the 24-cell
    fidelity legend past both sides, and a one-epoch fidelity curve (a line of one point) was
    invisible on an axis ticked 0.945, 0.960, …; then (issue 25) 24 one-point "curves" in
    repeating colours: one check epoch is now a row per cell, named on the row."""
    def inside(fig):
        fig.canvas.draw()
        renderer, box = fig.canvas.get_renderer(), fig.bbox
        for artist in [*fig.texts, *fig.legends, fig._suptitle]:
            extent = artist.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, artist
            assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, artist

    heat = [c.labels for c in tables.TABLES["table_beta_K"].cells()]
    runs, cells = _curves_root(tmp_path / "bk", "table_beta_K", heat, smoke=True)
    inside(report.build_figure("table_beta_K", runs, cells, smoke=True))
    root = tmp_path / "schemes"
    for i, cell in enumerate(tables.TABLES["table_schemes"].cells()):
        _record(root / str(i), "table_schemes", cell.labels, 0, "ok", 0.4, [(0, 0.5), (1, 0.4)],
                smoke=True, fidelity=[(0, 0.999, 0.01)])   # the first epoch only
    runs = report.read_runs(root)
    fig = report.build_fidelity_figure("table_schemes", runs, report.summarize(runs), smoke=True)
    inside(fig)
    assert report.SMOKE_BANNER in _texts(fig)
    names = [", ".join(f"{k}={v}" for k, v in c.labels.items())
             for c in tables.TABLES["table_schemes"].cells()]
    assert not fig.legends
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names   # the rows they share
    for ax in fig.axes:
        (dots,) = ax.lines
        assert dots.get_marker() == "o" and list(dots.get_ydata()) == list(range(24))
        assert ax.get_title() == "checked in epoch 1"   # epochs counted from 1

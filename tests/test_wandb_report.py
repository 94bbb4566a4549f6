"""``report --publish``: the W&B Report, one section per paper table with our numbers beside the
paper's, run-set panels over the table's W&B group, and the figures. Checked offline: the
specification, and the ``wandb_workspaces`` blocks and filters built from it (saving needs a login)."""
import csv
import json
import os
import subprocess
import sys

import warnings

import pytest

with warnings.catch_warnings():  # wandb-workspaces 0.4 still uses Pydantic V1 validators
    warnings.simplefilter("ignore", DeprecationWarning)
    from wandb_workspaces import expr
    import wandb_workspaces.reports.v2 as wr

from pcn_ep.experiments import report, reproduce, tables, wandb_report

COSTS = {"dataset": "mnist", "cost": "mse", "method": "ep"}


def _record(folder, table, labels, seed, top1, smoke=False):
    """A finished run as ``reproduce`` leaves it: run.json and a two-epoch metrics.csv."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(
        {"table": table, "cell": labels, "seed": seed, "status": "ok", "smoke": smoke}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "val/top1_error", "test/top1_error",
                                    "fidelity/min_cosine", "fidelity/max_rel_err"])
        writer.writeheader()
        writer.writerows([{"epoch": 0, "fidelity/min_cosine": 0.99, "fidelity/max_rel_err": 0.1},
                          {"epoch": 0, "val/top1_error": 0.5}, {"epoch": 1, "val/top1_error": top1},
                          {"epoch": 2, "test/top1_error": top1}])


@pytest.fixture
def results(tmp_path):
    """Table 1's MNIST MSE EP cell (2 seeds) and two cells of Fig. 2's β × K grid, reported."""
    root = tmp_path / "results"
    _record(root / "a", "table_costs", COSTS, 0, 0.0030)
    _record(root / "b", "table_costs", COSTS, 1, 0.0040)
    _record(root / "c", "table_beta_K", {"beta": 0.01, "K": 4}, 0, 0.31)
    _record(root / "d", "table_beta_K", {"beta": 0.5, "K": 1}, 0, 0.80)
    report.write_report(root, tmp_path / "out")
    return root, tmp_path / "out"


def _reported(root):
    """The tables and the kind of ``root``'s report, as ``report --publish`` passes them on."""
    smoke, tables_ = report.reported(root)
    return tables_, smoke


def _specification(root, out, **kw):
    return wandb_report.specification(root, out, *_reported(root), **kw)


def _grids(blocks):
    return [b for b in blocks if isinstance(b, wr.PanelGrid)]


def test_one_section_per_table_with_our_numbers_beside_the_papers(results):
    root, out = results
    spec = _specification(root, out, project="pcn-ep")
    assert [s["table"] for s in spec["sections"]] == ["table_beta_K", "table_costs"]  # paper order
    built = wandb_report.build_report(spec, entity="lab", figures_run="run123")
    assert built.project == "pcn-ep" and built.entity == "lab"
    headings = [b for b in built.blocks if isinstance(b, wr.H1)]
    assert [h.text for h in headings] == [tables.TABLES["table_beta_K"].title,
                                          tables.TABLES["table_costs"].title]
    costs = built.blocks[built.blocks.index(headings[1]) + 1]
    assert isinstance(costs, wr.MarkdownBlock)
    row = next(l for l in costs.text.splitlines() if l.startswith("| mnist | mse | ep"))
    assert "| 2 | ok | 0.35 ± 0.07 |" in row and row.endswith("| 0.32 ± 0.01 | n/a |")  # paper's
    assert not spec["smoke"] and report.SMOKE_BANNER not in spec["description"]


def test_run_sets_select_the_tables_group_as_reproduce_logs_it(results, tmp_path):
    root, out = results
    built = wandb_report.build_report(_specification(root, out), "lab", "run123")
    runsets = [g.runsets[0] for g in _grids(built.blocks) if g.runsets[0].name != "figures"]
    assert [r.name for r in runsets] == ["table_beta_K", "table_costs"]
    for runset in runsets:
        table = tables.TABLES[runset.name]
        cell = table.cells()[0]
        logger = reproduce.run_overlay(table, cell, 0, tmp_path, "pcn-ep", smoke=False)
        wandb = logger["trainer"]["logger"][1]["init_args"]
        assert (runset.entity, runset.project) == ("lab", wandb["project"])
        assert expr.string_to_filterexpr_list(runset.filters) == [
            expr.Metric("Group") == wandb["group"], expr.Config("smoke") == wandb["config"]["smoke"]]
        assert set(cell.labels) <= set(wandb["config"]["cell"])   # what cell.<label> panels read


def test_panels_draw_the_error_curves_the_beta_K_grid_and_the_figures(results):
    root, out = results
    built = wandb_report.build_report(_specification(root, out), "lab", "run123")
    beta_k, figure_bk, costs, figure_costs = _grids(built.blocks)
    heat, curve = beta_k.panels[:2]
    assert isinstance(heat, wr.ScatterPlot)
    assert (heat.x, heat.y, heat.z) == (wr.Config("cell.beta"), wr.Config("cell.K"),
                                        wr.SummaryMetric("test/top1_error"))
    assert isinstance(curve, wr.LinePlot) and curve.x == "epoch" and curve.y == ["val/top1_error"]
    assert curve.title == "Validation top-1 error per epoch (fraction)"   # W&B logs fractions
    # As table_costs.png, then the gradient-fidelity monitor (every table has EP runs).
    assert [p.y for p in costs.panels] == [["val/top1_error"], ["fidelity/min_cosine"],
                                           ["fidelity/max_rel_err"]]
    assert costs.panels[1].title == "Gradient cosine, EP vs backprop (worst tensor) per epoch"
    assert beta_k.panels[-1].y == ["fidelity/max_rel_err"]
    for grid, table in ((figure_bk, "table_beta_K"), (figure_costs, "table_costs")):
        (media,) = grid.panels
        assert isinstance(media, wr.MediaBrowser)
        assert media.media_keys == [f"figures/{table}", f"figures/{table}_fidelity"]
        assert expr.string_to_filterexpr_list(grid.runsets[0].filters) == \
            [expr.Metric("ID") == "run123"]
        assert (out / f"{table}.png").is_file() and (out / f"{table}_fidelity.png").is_file()
    # Before the figures are logged to a run there is nothing to point a media panel at.
    unpublished = wandb_report.build_report(_specification(root, out), "lab")
    assert not any(isinstance(p, wr.MediaBrowser) for g in _grids(unpublished.blocks) for p in g.panels)


def test_a_smoke_report_selects_smoke_runs_and_says_so(tmp_path):
    root = tmp_path / "smoke"
    _record(root / "a", "fig_init_gain", {"output_gain": 0.2, "method": "ep"}, 0, 0.4, smoke=True)
    _record(root / "e", "fig_energy", {"model": "vgg10"}, 0, 0.9, smoke=True)
    report.write_report(root, tmp_path / "out")
    spec = _specification(root, tmp_path / "out")
    assert spec["smoke"] and report.SMOKE_BANNER in spec["description"]
    gain, energy = spec["sections"][1], spec["sections"][0]
    assert "Config(\"smoke\") == True" in gain["runset"]["filters"]
    assert report.SMOKE_BANNER in gain["markdown"]
    assert energy["runset"] is None and energy["panels"] == []   # the energy tool logs no W&B run


def test_publish_without_a_key_writes_the_specification_and_says_so_in_one_line(results):
    root, out = results
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "pcn_ep", "report", str(root), "--out", str(out),
                           "--publish"], capture_output=True, text=True, timeout=300,
                          env={**env, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr
    (line,) = [l for l in done.stdout.splitlines() if not l.startswith("wrote ")]
    spec_path = out / "wandb_report.json"
    assert str(spec_path) in line and "wandb sync" in line and "--publish" in line
    spec = json.loads(spec_path.read_text())
    assert spec == json.loads(json.dumps(_specification(root, out)))
    assert not (out / "wandb").exists()   # nothing was logged


def test_a_key_without_network_falls_back_to_the_specification(results, monkeypatch):
    """With a key but no route to W&B (or without wandb-workspaces) the specification stays."""
    root, out = results

    def unreachable(spec, out):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("pcn_ep.training.loggers.wandb_offline", lambda: False)
    monkeypatch.setattr(wandb_report, "publish", unreachable)
    line, code = wandb_report.publish_or_describe(root, out, *_reported(root), "pcn-ep")
    assert code == 0 and "could not reach W&B (ConnectionError: no route to host)" in line
    assert "\n" not in line and (out / "wandb_report.json").is_file()
    monkeypatch.setattr(wandb_report.importlib.util, "find_spec", lambda name: None)
    line, code = wandb_report.publish_or_describe(root, out, *_reported(root), "pcn-ep")
    assert code == 1 and line.startswith("pcn_ep: error:") and "pcn-ep[wandb-report]" in line

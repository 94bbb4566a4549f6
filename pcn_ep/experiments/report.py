"""``python -m pcn_ep report RESULTS_DIR --out OUT_DIR [--publish]``: the paper's tables, ours beside.

Reads every run under RESULTS_DIR: the local records ``reproduce`` writes (``run.json`` with
``metrics.csv`` or ``energy.json``) and W&B run folders (``wandb/offline-run-*`` or ``run-*``; the
table is the run's group, the cell and seed its config). For each table it writes
``OUT_DIR/TABLE.md`` (mean ± std over seeds of the final test error in %, the paper's numbers from
``pcn_ep/experiments/paper_results.yaml`` in the next columns, the paper's claims below) and its figure
``OUT_DIR/TABLE.png``: a β×K heat map (Fig. 2), scheme bars (Fig. 1), F-vs-K curves (Fig. 8),
traversal heat maps (Fig. 5) or test-error training curves (the others; BP dashed).

``--publish`` also logs the tables and figures to W&B (project ``--wandb-project``, job type
``report``): online with an API key, otherwise into an offline run under OUT_DIR that ``wandb sync``
uploads later.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from .tables import TABLES

METRICS = ("test/top1_error", "test/top5_error")


@dataclass
class Run:
    table: str
    labels: dict
    seed: int
    status: str                                    # ok | diverged | failed | running
    smoke: bool = False                            # a --smoke run (digits, tiny nets)
    final: dict = field(default_factory=dict)      # metric → value (fraction)
    curves: dict = field(default_factory=dict)     # metric → {epoch: value}
    energy: dict | None = None                     # fig_energy's curves

    @property
    def key(self) -> tuple:
        return tuple(self.labels.items())


# -- reading runs -------------------------------------------------------------------------------
def _add(curves: dict, final: dict, row: dict, epoch: int | None) -> None:
    """One logged row: test/* values are final, val/* and train/error feed per-epoch curves."""
    for name, value in row.items():
        if value is None or value == "" or not name.startswith(("test/", "val/", "train/error")):
            continue
        value = float(value)
        if name.startswith("test/"):
            final[name] = value
        elif epoch is not None:
            curves.setdefault(name, defaultdict(list))[epoch].append(value)


def _mean_curves(curves: dict) -> dict:
    return {name: {e: sum(v) / len(v) for e, v in sorted(points.items())}
            for name, points in curves.items()}


def read_record(path: Path) -> Run:
    """A ``run.json`` written by ``reproduce`` and the metrics beside it."""
    record = json.loads(path.read_text())
    run = Run(record["table"], record["cell"], record["seed"], record["status"],
              record.get("smoke", False))
    metrics, energy = path.parent / "metrics.csv", path.parent / "energy.json"
    curves: dict = {}
    if metrics.exists():
        with open(metrics) as f:
            for row in csv.DictReader(f):
                epoch = int(float(row["epoch"])) if row.get("epoch") else None
                _add(curves, run.final, row, epoch)
    if energy.exists():
        run.energy = json.loads(energy.read_text())
    run.curves = _mean_curves(curves)
    return run


def _wandb_records(path: Path):
    """The protobuf records of a ``run-*.wandb`` file (a LevelDB-style log of 32 KiB blocks, each
    record chunk behind a 7-byte header: crc32, length, type; after a 7-byte ':W&B' file header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero-filled remainder
            pos += left - 7
            continue
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def read_wandb_run(folder: Path) -> Run | None:
    """A W&B run folder (offline or synced): group = table, config.cell / config.seed = the cell."""
    files_ = sorted(folder.glob("run-*.wandb"))
    if not files_:
        return None
    run, curves, exit_code = None, {}, None
    for record in _wandb_records(files_[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            if "cell" not in config:
                return None  # not a run of a reproduce table
            run = Run(record.run.run_group, config["cell"], config.get("seed", 0), "running",
                      config.get("smoke", False))
        elif kind == "history" and run is not None:
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            _add(curves, run.final, row, int(row["epoch"]) if "epoch" in row else None)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    if run is None:
        return None
    run.status = "running" if exit_code is None else ("ok" if exit_code == 0 else "failed")
    run.curves = _mean_curves(curves)
    return run


def read_runs(results: Path) -> list[Run]:
    """Every run under ``results``; a run folder with a local record is not read twice via W&B."""
    records = sorted(results.rglob("run.json"))
    runs = [read_record(p) for p in records]
    recorded = {p.parent for p in records}
    for wandb_file in sorted(results.rglob("run-*.wandb")):
        folder = wandb_file.parent
        if any(parent in recorded for parent in folder.parents):
            continue
        run = read_wandb_run(folder)
        if run is not None:
            runs.append(run)
    return runs


# -- tables -------------------------------------------------------------------------------------
def paper_results() -> dict:
    return yaml.safe_load((files("pcn_ep.experiments") / "paper_results.yaml").read_text())


def _matches(row: dict, labels: dict) -> bool:
    return all(str(labels.get(k)) == str(v) for k, v in row.items() if k not in ("top1", "top5"))


def _fmt(values: list[float]) -> str:
    if not values:
        return ""
    if any(math.isnan(v) for v in values):
        return "NaN"
    mean = statistics.mean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _paper(value) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, list):
        return str(value)
    decimals = len(str(value[0]).partition(".")[2])  # the std to the mean's precision: 0.33 ± 0.00
    return f"{value[0]} ± {value[1]:.{decimals}f}"


def summarize(runs: list[Run]) -> dict[tuple, dict]:
    """Per cell, in the table's grid order: labels, runs and final errors in % (NaN: diverged)."""
    order = {tuple(c.labels.items()): i for table in TABLES.values() for i, c in enumerate(table.cells())}
    cells: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: (order.get(r.key, len(order)), r.seed)):
        cell = cells.setdefault(run.key, {"labels": run.labels, "runs": [], "top1": [], "top5": []})
        cell["runs"].append(run)
        if run.status == "diverged":
            cell["top1"].append(math.nan)
            cell["top5"].append(math.nan)
        for k in ("top1", "top5"):
            if f"test/{k}_error" in run.final:
                cell[k].append(100 * run.final[f"test/{k}_error"])
    return cells


def markdown(table: str, runs: list[Run], cells: dict, paper: dict) -> str:
    title = TABLES[table].title if table in TABLES else table
    info = paper.get(table, {})
    lines = [f"# {title}", "", f"Paper: {info.get('source', 'n/a')}. Test error in %, mean ± std "
             f"over seeds; NaN = diverged."]
    if any(r.smoke for r in runs):
        lines += ["", "**Smoke runs** (`--smoke`: digits, 1/16-width nets, 2 epochs): they check the "
                  "pipeline and are not comparable with the paper's numbers."]
    if any(not r.energy for r in runs):
        keys = list(next(iter(cells.values()))["labels"]) if cells else []
        has_paper = bool(info.get("rows"))
        head = keys + ["seeds", "status", "top-1 (ours)", "top-5 (ours)"]
        head += ["top-1 (paper)", "top-5 (paper)"] if has_paper else []
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell in cells.values():
            statuses = sorted({r.status for r in cell["runs"]})
            row = [str(cell["labels"].get(k, "")) for k in keys]
            row += [str(len(cell["runs"])), ",".join(statuses), _fmt(cell["top1"]), _fmt(cell["top5"])]
            if has_paper:
                match = next((p for p in info["rows"] if _matches(p, cell["labels"])), {})
                row += [_paper(match.get("top1")), _paper(match.get("top5"))]
            lines.append("| " + " | ".join(row) + " |")
    for run in runs:
        if run.energy:
            lines += ["", "| curve | F(K=0) | F(K=K_config) | ΔF |", "|---|---|---|---|"]
            for name, c in run.energy["curves"].items():
                k = min(run.energy["K_config"], len(c["mean"]) - 1)
                lines.append(f"| {name} | {c['mean'][0]:.4g} | {c['mean'][k]:.4g} | "
                             f"{run.energy['delta_F'][name]:+.4g} |")
    if info.get("literature"):
        lines += ["", "Other rows of the paper's table (not reproduced here):", "",
                  "| setting | top-1 | top-5 |", "|---|---|---|"]
        lines += [f"| {r['setting']} | {r.get('top1', '')} | {r.get('top5', '')} |"
                  for r in info["literature"]]
    if info.get("claims"):
        lines += ["", "What the paper states (no numbers in the text):", ""]
        lines += [f"- {c}" for c in info["claims"]]
    if any(r.status == "failed" for r in runs):
        lines += ["", "Some runs failed: see their log.txt."]
    return "\n".join(lines) + "\n"


# -- figures ------------------------------------------------------------------------------------
def _heatmap(ax, cells: dict, rows: str, cols: str, title: str) -> None:
    import numpy as np

    row_values = sorted({c["labels"][rows] for c in cells.values()}, key=float)
    col_values = sorted({c["labels"][cols] for c in cells.values()}, key=float)
    grid = np.full((len(row_values), len(col_values)), np.nan)
    for c in cells.values():
        if c["top1"] and not any(map(math.isnan, c["top1"])):  # a diverged seed makes it NaN
            grid[row_values.index(c["labels"][rows]), col_values.index(c["labels"][cols])] = \
                statistics.mean(c["top1"])
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "NaN" if math.isnan(v) else f"{v:.1f}", ha="center", va="center",
                color="red" if math.isnan(v) else "white", fontsize=8)
    ax.set_xticks(range(len(col_values)), [str(v) for v in col_values])
    ax.set_yticks(range(len(row_values)), [str(v) for v in row_values])
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="test top-1 error (%)")


def _facets(cells: dict, key: str | None) -> dict:
    groups: dict = {}
    for k, c in cells.items():
        groups.setdefault(c["labels"].get(key) if key else None, {})[k] = c
    return groups


def _bars(ax, cells: dict, x: str, hue: str, title: str) -> None:
    x_values = list(dict.fromkeys(c["labels"][x] for c in cells.values()))
    hues = list(dict.fromkeys(c["labels"][hue] for c in cells.values()))
    width = 0.8 / len(hues)
    for i, h in enumerate(hues):
        means, errs = [], []
        for xv in x_values:
            c = next((c for c in cells.values() if c["labels"][x] == xv and c["labels"][hue] == h), None)
            v = c["top1"] if c else []
            means.append(statistics.mean(v) if v else math.nan)
            errs.append(statistics.stdev(v) if len(v) > 1 else 0)
        ax.bar([j + i * width for j in range(len(x_values))], means, width, yerr=errs, label=h)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(x_values))], x_values)
    ax.set_ylabel("test top-1 error (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _energy(axes, run: Run) -> None:
    """One panel per rule and sign of β, as Fig. 8: F(K) per image (thin) and their mean."""
    for ax, (name, c) in zip(axes.flat, run.energy["curves"].items()):
        for per_image in c["per_image"]:
            ax.plot(run.energy["K"], per_image, color="gray", alpha=0.4, lw=0.8)
        ax.plot(run.energy["K"], c["mean"], color="tab:blue", lw=2, label="mean")
        ax.axvline(run.energy["K_config"], color="tab:red", lw=0.8, label="K of training")
        rule, sign = name.split("/")
        ax.set_title(f"{rule}, beta = {sign}{run.energy['beta']}")
        ax.set_xlabel("nudge iteration K")
        ax.set_ylabel("F = E + beta C")
        ax.legend(fontsize=8)


def _curves(axes, cells: dict, metrics: tuple[str, ...], facet: str | None = None) -> None:
    for ax, metric in zip(axes, metrics):
        for c in cells.values():
            points: dict = defaultdict(list)
            for run in c["runs"]:
                for epoch, v in run.curves.get(metric, {}).items():
                    points[epoch].append(100 * v)
            if not points:
                continue
            epochs = sorted(points)
            label = ", ".join(f"{k}={v}" for k, v in c["labels"].items() if k != facet)
            style = "--" if c["labels"].get("method") == "bp" else "-"
            ax.plot([e + 1 for e in epochs], [statistics.mean(points[e]) for e in epochs], style,
                    label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (%)")
        if ax.lines:
            ax.legend(fontsize=6)


# Training-curve figures: (panel per value of this label, metrics plotted); the default is one
# panel each for val top-1 and top-5 (with val_size 0 the val split is the test split, as the
# paper's curves).
CURVES = {"table_costs": ("dataset", ("val/top1_error",)),
          "table_pgd": ("dataset", ("val/top1_error",)),
          "fig_batch_size": (None, ("val/top1_error", "train/error"))}


def figure(table: str, runs: list[Run], cells: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if table in ("table_beta_K", "fig_traversal", "table_schemes"):
        facet = {"table_beta_K": None, "fig_traversal": "order", "table_schemes": "dataset"}[table]
        groups = _facets(cells, facet)
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
        for ax, (name, group) in zip(axes[0], groups.items()):
            title = f"{facet}={name}" if facet else "VGG5 CIFAR-100"
            if table == "table_schemes":
                _bars(ax, group, "scheme", "method", title)
            elif table == "table_beta_K":
                _heatmap(ax, group, "beta", "K", title)
            else:
                _heatmap(ax, group, "K", "alpha", title)
    elif table == "fig_energy":
        run = next((r for r in runs if r.energy), None)
        if run is None:
            return None
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        _energy(axes, run)
    else:
        if not any(r.curves for r in runs):
            return None
        facet, metrics = CURVES.get(table, (None, ("val/top1_error", "val/top5_error")))
        if facet:  # one panel per data set, top-1 only
            groups = _facets(cells, facet)
            fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
            for ax, (name, group) in zip(axes[0], groups.items()):
                _curves([ax], group, metrics, facet)
                ax.set_title(f"{facet}={name}")
        else:
            fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5))
            _curves(axes, cells, metrics)
    fig.suptitle(table)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry points -------------------------------------------------------------------------------
def write_report(results: Path, out: Path, tables: list[str] | None = None) -> list[Path]:
    """Write TABLE.md and TABLE.png for every table with runs under ``results``; return the paths."""
    runs = read_runs(results)
    if not runs:
        raise FileNotFoundError(f"no runs (run.json or W&B run folders) under {results}")
    paper = paper_results()
    by_table: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_table[run.table].append(run)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables or sorted(by_table):
        if table not in by_table:
            raise FileNotFoundError(f"no runs of {table} under {results}")
        table_runs, md = by_table[table], out / f"{table}.md"
        cells = summarize(table_runs)
        md.write_text(markdown(table, table_runs, cells, paper))
        written.append(md)
        png = figure(table, table_runs, cells, out / f"{table}.png")
        if png:
            written.append(png)
    return written


def publish(paths: list[Path], project: str, out: Path) -> None:
    """Log the Markdown tables and PNG figures to one W&B run of job type ``report``."""
    import wandb

    from ..training.loggers import wandb_offline

    run = wandb.init(project=project, job_type="report", dir=str(out),
                     mode="offline" if wandb_offline() else "online")
    for path in paths:
        if path.suffix == ".png":
            run.log({f"figures/{path.stem}": wandb.Image(str(path))})
        else:
            run.log({f"tables/{path.stem}": wandb.Html(f"<pre>{path.read_text()}</pre>")})
    run.finish()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcn_ep report", description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tables", nargs="+", default=None, help="default: every table found")
    p.add_argument("--publish", action="store_true", help="also log the report to W&B")
    p.add_argument("--wandb-project", default="pcn-ep")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.results.is_dir():
        print(f"report: error: results folder not found: {args.results}", file=sys.stderr)
        return 1
    try:
        paths = write_report(args.results, args.out, args.tables)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    if args.publish:
        publish(paths, args.wandb_project, args.out)
    return 0

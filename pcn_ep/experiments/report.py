"""``python -m pcn_ep report RESULTS_DIR --out OUT_DIR [--publish]``: the paper's tables, ours beside.

Reads the runs of one results root RESULTS_DIR: the local records ``reproduce`` writes (``run.json``
with ``metrics.csv`` or ``energy.json``) and W&B run folders (``wandb/offline-run-*`` or ``run-*``;
the table is the run's group, the cell and seed its config). A run stopped and resumed is one run:
its CSV history is one file, and the W&B folders of one run id (one per command) are read as one
run, in order of start time (``pcn_ep.training.loggers`` says where a run's history goes). A
folder inside RESULTS_DIR that is a results root of its own (it holds ``reproduce``'s marker, e.g.
``results/smoke/``) is not read, and smoke and real runs are never reported together: a root
with real runs reports those only (the smoke runs are counted and left out), a root of smoke runs
only gives a smoke report, marked as such in every Markdown file and figure. A run's status is
its own exit as ``run.json`` records it (or a status the CLI wrote into the W&B summary); a W&B
folder alone with logger exit code 0 is ``unknown``, never ``ok``, and only ``ok`` runs (and
diverged ones, as NaN) give numbers. For each table it writes
``OUT_DIR/TABLE.md`` (mean ± std over seeds of the final test error in %, the paper's numbers from
``pcn_ep/experiments/paper_results.yaml`` in the next columns, the paper's claims below) and its figure
``OUT_DIR/TABLE.png``: a β×K heat map (Fig. 2), scheme bars (Fig. 1), F-vs-K curves (Fig. 8),
traversal heat maps (Fig. 5) or error training curves (the others; BP dashed, wide and under
EP, so that curves that coincide both show; a colour and marker per cell). Where EP runs logged the
gradient-fidelity monitor, ``OUT_DIR/TABLE_fidelity.png`` draws it per epoch, or as a dot per cell
when no cell was checked in two epochs.

``--publish`` also builds the W&B Report of these tables (``wandb_report``); without a W&B key or
network it writes the Report's specification to ``OUT_DIR/wandb_report.json`` and says how to
publish it later.

Safe on anyone's results folder: the report writes only inside ``OUT_DIR``. A name read from a
run's files that ends up in a file name or a table (the table, the cell's labels) must be a plain
name (``SAFE_NAME``: letters, digits, ``_ . = + -``, no leading dot, so no separator, ``..`` or
absolute path), and every path written is checked to resolve inside ``OUT_DIR`` (a symlink planted
there is refused). A run whose files cannot be read as a run (not JSON, a list, missing keys, wrong
types, such a name, a metrics.csv value that is not a number, a FIFO or folder in a file's place) is
skipped with one ``pcn_ep: warning:`` line naming the file, and the other runs are reported: one
bad run never breaks every table. A ``.wandb`` file that stops inside a record (a killed run, or one
still writing) or holds a record that does not decode is read up to there, with a warning; its
status then comes from what was read (no exit record: ``running``, no numbers). Faults of the
command itself (results folder missing or a file, ``--out`` a file or not writable) are one
``pcn_ep: error:`` line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import struct
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from ..commandline import CommandParser
from .results import (CURVES, FIDELITY, MARKER, READ_ERRORS, SMOKE_BANNER, Unreadable,
                      curve_metrics, output_path, read_file as _read, root_kind, show as _show,
                      title_of, warn, why as _why, words)
from .tables import TABLES

METRICS = ("test/top1_error", "test/top5_error")
STATUSES = ("ok", "diverged", "failed")
STATES = STATUSES + ("stopped", "running", "unknown")   # what a Run's status may be
# A name read from a file that may become part of a file name: no separator, no leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]{0,99}")
# The labels a table's figure indexes (heat-map axes, bar groups): a run lacking one is skipped.
FIGURE_LABELS = {"table_beta_K": ("beta", "K"), "fig_traversal": ("K", "alpha"),
                 "table_schemes": ("scheme", "method")}


@dataclass
class Run:
    table: str
    labels: dict
    seed: int
    status: str                                    # ok|diverged|failed|stopped|running|unknown
    smoke: bool = False                            # a --smoke run (digits, tiny nets)
    final: dict = field(default_factory=dict)      # metric → value (fraction)
    curves: dict = field(default_factory=dict)     # metric → {epoch: value}
    energy: dict | None = None                     # fig_energy's curves

    @property
    def key(self) -> tuple:
        return tuple(self.labels.items())


# -- reading runs -------------------------------------------------------------------------------
def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Unreadable(f"{name} = {_show(value)} is not a number")
    try:
        return float(value)
    except ValueError:
        raise Unreadable(f"{name} = {_show(value)} is not a number") from None


def _epoch(value) -> int:
    epoch = _number("epoch", value)
    if not epoch.is_integer() or epoch < 0:
        raise Unreadable(f"epoch = {_show(value)} is not a whole number ≥ 0")
    return int(epoch)


def _add(curves: dict, final: dict, row: dict, epoch: int | None) -> None:
    """One logged row: test/* values are final; val/*, train/error and the gradient-fidelity
    monitor's fidelity/* feed per-epoch curves. A value that is not a number is ``Unreadable``."""
    for name, value in row.items():
        if name is None:   # csv.DictReader's key for the fields beyond the header
            raise Unreadable(f"a row has more fields than the header: {_show(value)}")
        if value is None or value == "" or not name.startswith(("test/", "val/", "train/error",
                                                                  "fidelity/")):
            continue
        value = _number(name, value)
        if name.startswith("test/"):
            final[name] = value
        elif epoch is not None:
            curves.setdefault(name, defaultdict(list))[epoch].append(value)


def _mean_curves(curves: dict) -> dict:
    return {name: {e: sum(v) / len(v) for e, v in sorted(points.items())}
            for name, points in curves.items()}


def safe_name(value, what: str) -> str:
    """``value`` if it is a plain name (``SAFE_NAME``), else ``Unreadable``: a table or label read
    from a file must not become a path outside the report's folder (``../x``, ``/tmp/x``)."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise Unreadable(f"{what} {_show(value)} is not a plain name (letters, digits, _ . = + -, "
                         "no leading dot, at most 100)")
    return value


def checked(run: Run) -> Run:
    """``run`` if what its files said has the types the report relies on, else ``Unreadable``:
    the table and the text labels are plain names, label values are text or finite numbers (the
    ones the table's figure indexes present, each of the table's kind), the seed a whole number,
    the status one of ``STATES``, smoke a boolean."""
    safe_name(run.table, "table")
    if not isinstance(run.labels, dict):
        raise Unreadable(f"cell {_show(run.labels)} is not a mapping of labels")
    for key, value in run.labels.items():
        safe_name(key, "cell label")
        if isinstance(value, str):
            safe_name(value, f"cell label {key} =")
        elif not _numbers([value]) or not math.isfinite(value):
            raise Unreadable(f"cell label {key} = {_show(value)} is neither a name nor a number")
    if run.table in TABLES:
        kinds = {k: isinstance(v, str) for c in TABLES[run.table].cells()
                 for k, v in c.labels.items()}
        wrong = [k for k, v in run.labels.items() if k in kinds and isinstance(v, str) != kinds[k]]
        wrong += [k for k in FIGURE_LABELS.get(run.table, ()) if k not in run.labels]
        if wrong:
            raise Unreadable(f"cell {_show(run.labels)} does not fit {run.table} (label "
                             f"{', '.join(wrong)} missing or of the wrong kind)")
    if isinstance(run.seed, bool) or not isinstance(run.seed, int):
        raise Unreadable(f"seed {_show(run.seed)} is not a whole number")
    if not isinstance(run.status, str) or run.status not in STATES:
        raise Unreadable(f"status {_show(run.status)} is not one of {', '.join(STATES)}")
    if not isinstance(run.smoke, bool):
        raise Unreadable(f"smoke {_show(run.smoke)} is not true or false")
    return run


def _numbers(values, n: int | None = None) -> bool:
    return (isinstance(values, list) and bool(values) and (n is None or len(values) == n)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))


def _energy_ok(e) -> bool:
    """An ``energy.json`` as ``pcn_ep energy`` writes it: what markdown and _energy index."""
    return (isinstance(e, dict) and _numbers(e.get("K")) and _numbers([e.get("beta")])
            and type(e.get("K_config")) is int and isinstance(e.get("curves"), dict)
            and isinstance(e.get("delta_F"), dict) and all(
                isinstance(name, str) and name.count("/") == 1 and isinstance(c, dict)
                and _numbers(c.get("mean"), len(e["K"])) and _numbers([e["delta_F"].get(name)])
                and isinstance(c.get("per_image"), list)
                and all(_numbers(p, len(e["K"])) for p in c["per_image"])
                for name, c in e["curves"].items()))


def metrics_files(folder: Path) -> list[Path]:
    """A run folder's CSV history: ``metrics.csv`` beside ``run.json`` (``reproduce``), else
    ``csv/metrics.csv`` (pcn_ep's ``CSVLogger`` as the configs name it: one file, however often the
    run was resumed), else the ``csv/version_N/metrics.csv`` of Lightning's own logger (a version
    per command), read in order as one history."""
    for path in (folder / "metrics.csv", folder / "csv" / "metrics.csv"):
        if path.exists() or path.is_symlink():
            return [path]
    versions = {p: p.parent.name.removeprefix("version_") for p in
                folder.glob("csv/version_*/metrics.csv")}
    return sorted((p for p, v in versions.items() if v.isdigit()), key=lambda p: int(versions[p]))


def read_record(path: Path) -> Run:
    """A ``run.json`` written by ``reproduce`` and the metrics beside it; ``Unreadable`` (or the
    ``READ_ERRORS`` of reading) when they cannot be read as a run."""
    record = json.loads(_read(path))
    if not isinstance(record, dict):
        raise Unreadable(f"not a JSON object but a {type(record).__name__}")
    missing = [k for k in ("table", "cell", "seed", "status") if k not in record]
    if missing:
        raise Unreadable(f"no {', '.join(missing)}")
    run = checked(Run(record["table"], record["cell"], record["seed"], record["status"],
                      record.get("smoke", False)))
    energy = path.parent / "energy.json"
    curves: dict = {}
    for metrics in metrics_files(path.parent):
        if not metrics.is_file():
            raise Unreadable(f"{metrics} is not a regular file")
        with open(metrics, encoding="utf-8", newline="") as f:
            for line, row in enumerate(csv.DictReader(f), 2):
                try:
                    _add(curves, run.final, row, _epoch(row["epoch"]) if row.get("epoch") else None)
                except Unreadable as err:
                    raise Unreadable(f"{metrics} line {line}: {err}") from None
    if energy.exists():
        run.energy = json.loads(_read(energy))
        if not _energy_ok(run.energy):
            raise Unreadable(f"{energy} is not what pcn_ep energy writes")
    run.curves = _mean_curves(curves)
    return run


def _wandb_records(path: Path):
    """The protobuf records of a ``run-*.wandb`` file (a LevelDB-style log of 32 KiB blocks, each
    record chunk behind a 7-byte header: crc32, length, type; after a 7-byte ':W&B' file header).
    A file that stops inside a record (a killed run, or one still writing) or holds a chunk that
    does not decode yields the records before it, then raises ``Unreadable``."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = _read(path, binary=True), 32768, 7, b""
    if not data.startswith(b":W&B"):
        raise Unreadable("empty or not a W&B run file (no ':W&B' header)")
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
        if kind not in (1, 2, 3, 4) or pos + length > len(data):
            raise Unreadable(f"cut short or corrupt at byte {pos - 7}")
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(chunk)
            except DecodeError:
                raise Unreadable(f"a record ending at byte {pos} does not decode") from None
            yield record
            chunk = b""
    if chunk or pos < len(data):
        raise Unreadable(f"cut short at byte {len(data)}")


def read_wandb_run(folder: Path, file: Path | None = None, warn=warn) -> Run | None:
    """A W&B run folder (offline or synced): group = table, config.cell / config.seed = the cell.
    A file that breaks off is read up to there (one warning); ``Unreadable`` when not even the
    run's own record could be read."""
    files_ = [file] if file else sorted(folder.glob("run-*.wandb"))[:1]
    return read_wandb_parts(files_, warn) if files_ else None


EVALUATION_STATUSES = ("run/validate_status", "run/test_status")   # a separate validate / test


def _read_wandb_part(file: Path, warn=warn) -> dict | None:
    """One ``.wandb`` file, one command's part of a W&B run: its run (``None``: not a run of a
    reproduce table), start time, history rows, exit code, the status the CLI wrote, and whether
    it was a separate ``validate``/``test`` (it writes ``run/test_status``, not ``run/status``)."""
    part = {"file": file, "run": None, "start": 0, "rows": [], "exit": None, "status": None,
            "evaluation": False}
    scratch: tuple[dict, dict] = ({}, {})   # each row is checked as it is read
    try:
        for record in _wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
                if "cell" not in config:
                    return None  # not a run of a reproduce table
                part["run"] = checked(Run(record.run.run_group, config["cell"],
                                          config.get("seed", 0), "running",
                                          config.get("smoke", False)))
                part["start"] = record.run.start_time.ToNanoseconds()
                part["status"] = _summary_status(record.run.summary.update) or part["status"]
            elif kind == "history" and part["run"] is not None:
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}
                _add(*scratch, row, _epoch(row["epoch"]) if "epoch" in row else None)
                part["rows"].append(row)
            elif kind == "summary":
                part["status"] = _summary_status(record.summary.update) or part["status"]
                part["evaluation"] |= any((i.key or "/".join(i.nested_key)) in EVALUATION_STATUSES
                                          for i in record.summary.update)
            elif kind == "exit":
                part["exit"] = record.exit.exit_code
    except (ValueError, RecursionError) as err:
        if part["run"] is None:
            raise
        warn(f"{file}: {_why(err)}; read up to there")
    return part if part["run"] is not None else None


def read_wandb_parts(files: list[Path], warn=warn) -> Run | None:
    """One W&B run from the files of its parts (one ``.wandb`` file per command: a run stopped and
    resumed N times is N+1 folders ``offline-run-TIME-ID`` of one id): their history in order of
    start time, its status that of the last ``fit`` part (a separate ``validate``/``test`` does
    not change it), as ``wandb sync`` makes them one W&B run. A part that cannot be read (a killed
    command's file, cut before W&B wrote its first records) is one warning; the others are read."""
    parts = []
    for file in files:
        try:
            part = _read_wandb_part(file, warn)
        except READ_ERRORS as err:
            if len(files) == 1:
                raise
            warn(f"{file}: {_why(err)}; this part of the run left out")
            continue
        if part is not None:
            parts.append(part)
    if not parts:
        return None
    parts.sort(key=lambda p: (p["start"], str(p["file"])))
    run, curves = parts[0]["run"], {}
    for part in parts:
        for row in part["rows"]:
            _add(curves, run.final, row, _epoch(row["epoch"]) if "epoch" in row else None)
    last = next((p for p in reversed(parts) if not p["evaluation"]), parts[-1])
    run.status = wandb_status(last["exit"], last["status"])
    run.curves = _mean_curves(curves)
    return run


def _summary_status(items) -> str | None:
    """A status the CLI wrote into the W&B summary (``status`` or ``run/status``): ``stopped`` too
    (by a signal, to be resumed: a later part of the run says how it went on)."""
    for item in items:
        if (item.key or "/".join(item.nested_key)) in ("status", "run/status"):
            value = json.loads(item.value_json)
            if value in STATUSES + ("stopped",):
                return value
    return None


def wandb_status(exit_code: int | None, summary_status: str | None) -> str:
    """A W&B-only run's status. The logger's exit code is not the run's: a run that fails its config
    check (or its data) still closes W&B with exit code 0. So only a status the CLI wrote is
    evidence of success; a non-zero exit code is evidence of failure; anything else is unknown."""
    if summary_status:
        return summary_status
    if exit_code is None:
        return "running"
    return "failed" if exit_code != 0 else "unknown"


def nested_roots(results: Path) -> list[Path]:
    """Results roots inside ``results`` (e.g. ``results/smoke/``): their runs are not ``results``'."""
    return [m.parent for m in results.rglob(MARKER) if m.parent != results]


def read_runs(results: Path, warn=warn) -> list[Run]:
    """Every run of the results root ``results`` (not of the roots nested in it); a run folder
    with a local record is not read twice via W&B. A run whose files cannot be read is skipped
    with one ``warn`` line naming the file: one bad run does not hide the others."""
    nested = nested_roots(results)

    def own(path: Path) -> bool:
        return not any(root in path.parents for root in nested)

    def read(path: Path, reader):
        try:
            return reader()
        except READ_ERRORS as err:
            warn(f"{path}: {_why(err)}; run skipped")

    records = [p for p in sorted(results.rglob("run.json")) if own(p)]
    runs = [read(p, lambda: read_record(p)) for p in records]
    recorded = {p.parent for p in records}
    parts = defaultdict(list)   # one W&B run: the files run-ID.wandb of one id in one wandb/ folder
    for wandb_file in sorted(results.rglob("run-*.wandb")):
        folder = wandb_file.parent
        if (not own(folder) or any(parent in recorded for parent in folder.parents)
                or wandb_file != min(folder.glob("run-*.wandb"))):   # one file per part's folder
            continue
        parts[(folder.parent, wandb_file.name)].append(wandb_file)
    for files_ in parts.values():
        runs.append(read(files_[0], lambda: read_wandb_parts(files_, warn)))
    return [r for r in runs if r is not None]


def split_kind(runs: list[Run], smoke: bool | None) -> tuple[bool, list[Run], list[Run]]:
    """(smoke?, the runs reported, the runs of the other kind left out). ``smoke=None``: a real
    report as soon as there is one real run, else a smoke report."""
    if smoke is None:
        smoke = all(r.smoke for r in runs)
    return smoke, [r for r in runs if r.smoke == smoke], [r for r in runs if r.smoke != smoke]


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
        if run.status != "ok":  # failed, unknown, running: no evidence the numbers are final
            continue
        for k in ("top1", "top5"):
            if f"test/{k}_error" in run.final:
                cell[k].append(100 * run.final[f"test/{k}_error"])
    return cells


PAPER_KEY = {"val/top1_error": "top1", "val/top5_error": "top5"}  # a curve's final test number
FIDELITY_CAPTION = ("Figure: the gradient-fidelity monitor (GradientFidelity) per epoch, the mean of "
                    "its checks in that epoch: the worst parameter tensor's cosine and relative "
                    "error between EP's gradient estimate and backprop's gradient on the same batch "
                    "and weights (1 and 0 are exact; the axes span at least 0.99–1 and 0–0.1, relative "
                    "errors over more than two decades on a log axis; cells side by side, at most "
                    "0.15 epoch off).")
FIDELITY_DOTS_CAPTION = ("Figure: the gradient-fidelity monitor (GradientFidelity), one row per EP "
                         "cell: every run was checked in one epoch only, so a dot (the mean of its "
                         "checks, mean over seeds), not a curve: the worst parameter tensor's cosine "
                         "and relative error between EP's gradient estimate and backprop's gradient "
                         "on the same batch and weights (1 and 0 are exact; the axes span at least "
                         "0.99–1 and 0–0.1, so that equal values look equal; relative errors over more "
                         "than two decades on a log axis).")
def _network(energy: dict) -> str:
    """The network ``pcn_ep energy`` evaluated: a checkpoint's, or the one at initialization."""
    ckpt = energy.get("checkpoint")
    if isinstance(ckpt, str) and ckpt:
        return f"the checkpoint {_show(Path(ckpt).name)}"
    return "at initialization (untrained: reproduce's --energy-ckpt gives a trained one)"


def _images(energy: dict) -> str:
    n = energy.get("images")
    return f"{n} validation images" if type(n) is int else "the first validation images"


def smoke_banner(table: str, runs: list[Run]) -> str:
    """What a smoke table ran, on its figure and above its Markdown. Fig. 8's energy tool trains
    nothing: its banner names the network and the images, not training epochs."""
    energy = next((r.energy for r in runs if r.energy), None)
    if table != "fig_energy" or energy is None:
        return SMOKE_BANNER
    ckpt = "at initialization" if "initialization" in _network(energy) else "from a checkpoint"
    return (f"SMOKE RUN (--smoke: a 1/16-width VGG10 {ckpt}, "
            f"{_images(energy)} of the digits, no training): a pipeline check, not comparable "
            "with the paper's numbers")


def energy_run(energy: dict) -> str:
    """Fig. 8's Markdown: what was run, in place of the test errors the other tables give."""
    return (f"Ran: `pcn_ep energy` on {_images(energy)}, the network {_network(energy)}, "
            f"β = ±{energy['beta']}, K = 0..{energy['K'][-1]} nudge iterations (K of training = "
            f"{energy['K_config']}). No training and no test error: the table gives the mean F "
            "at K = 0 and at K of training, and ΔF = F(K of training) − F(0).")


def caption(table: str, paper: dict, smoke: bool = False) -> str:
    """What the figure shows, in words: the same sentence heads the Markdown and foots the PNG."""
    if table in ("table_beta_K", "fig_traversal"):
        return "Figure: final test top-1 error (%) of each cell, mean over seeds (NaN: diverged)."
    if table == "table_schemes":
        return "Figure: final test top-1 error (%) per scheme and method, mean ± std over seeds."
    if table == "fig_energy":
        return ("Figure: F = E + βC against the nudge iteration K, per image (grey) and their "
                "mean; where images give the same curve, the panel's title says how many show.")
    metrics = curve_metrics(table)
    split = ("smoke runs validate on a held-out split of the digits" if smoke
             else "the paper's configs validate on the test split, val_size 0")
    text = (f"Figure: {' and '.join(words(m).lower() for m in metrics)} per epoch (lines; BP "
            f"dashed, wide and under EP, so that EP shows where they coincide; cells side by side, "
            f"at most 0.15 epoch off; {split}); ◆ the "
            "final test error of this table (BP's hollow)")
    if paper.get(table, {}).get("rows"):
        text += "; dotted lines: the paper's final test error"
    return text + "."


def markdown(table: str, runs: list[Run], cells: dict, paper: dict, smoke: bool = False,
             left_out: int = 0) -> str:
    info = paper.get(table, {})
    lines = [f"# {title_of(table)}", ""]
    if smoke:
        lines += [f"**{smoke_banner(table, runs)}.**", ""]
    energy = [r.energy for r in runs if r.energy]
    what = (energy_run(energy[0]) if energy and len(energy) == len(runs) else
            "Test error in %, mean ± std over the seeds whose run ended ok; NaN = diverged.")
    lines += [f"Paper: {info.get('source', 'n/a')}. {what}", "", caption(table, paper, smoke)]
    if left_out:
        other = "real" if smoke else "smoke"
        lines += ["", f"Left out: {left_out} {other} run(s) found under the same folder (smoke and "
                  "real runs are never reported together; give each its own results folder)."]
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
            lines += ["", f"| curve | F(K=0) | F(K={run.energy['K_config']}, training's) | ΔF |",
                      "|---|---|---|---|"]
            for name, c in run.energy["curves"].items():
                k = min(run.energy["K_config"], len(c["mean"]) - 1)
                lines.append(f"| {name} | {c['mean'][0]:.4g} | {c['mean'][k]:.4g} | "
                             f"{run.energy['delta_F'][name]:+.4g} |")
    lines += _fidelity_lines(table, cells)
    if info.get("literature"):
        lines += ["", "Other rows of the paper's table (not reproduced here):", "",
                  "| setting | top-1 | top-5 |", "|---|---|---|"]
        lines += [f"| {r['setting']} | {r.get('top1', '')} | {r.get('top5', '')} |"
                  for r in info["literature"]]
    if info.get("claims"):
        lines += ["", "What the paper states (no numbers in the text):", ""]
        lines += [f"- {c}" for c in info["claims"]]
    if any(r.status == "failed" for r in runs):
        lines += ["", "Some runs failed: see their log.txt; a failed run gives no numbers."]
    if any(r.status == "stopped" for r in runs):
        lines += ["", "stopped: a run stopped by a signal after saving last.ckpt (a preempted "
                  "job); rerunning the table resumes it. It gives no numbers yet."]
    if any(r.status in ("unknown", "running") for r in runs):
        lines += ["", "unknown / running: a W&B run folder with no run.json beside it and no status "
                  "written by the CLI. The logger's exit code is not the run's (a run that fails its "
                  "config check still closes W&B cleanly), so these runs give no numbers."]
    return "\n".join(lines) + "\n"


def has_fidelity(runs: list[Run]) -> bool:
    return any(metric in run.curves for run in runs for metric in FIDELITY)


def _fidelity_lines(table: str, cells: dict) -> list[str]:
    """The fidelity monitor's worst cosine and relative error in the first and last epoch it
    checked, per EP cell (mean over the runs that ended ok or diverged). A cell checked in one
    epoch has one value, not a first and a last."""
    rows, twice = [], any(_checked(c) > 1 for c in cells.values())
    for cell in cells.values():
        points = {m: _points(cell, m) for m in FIDELITY}
        epochs = sorted(points[FIDELITY[0]])
        if not epochs or not all(points.values()):
            continue
        ends = (epochs[0], epochs[-1]) if twice else (epochs[0],)
        values = [f"{statistics.mean(points[m][e]):.4f}" if e in points[m] else "—"
                  for m in FIDELITY for e in ends]
        if twice and len(epochs) == 1:   # one check epoch: no "last" to give
            values[1::2] = ["—"] * len(FIDELITY)
        rows.append("| " + ", ".join(f"{k}={v}" for k, v in cell["labels"].items()) + " | "
                    + ", ".join(str(e + 1) for e in epochs) + " | " + " | ".join(values) + " |")
    if not rows:
        return []
    text = (f"Gradient fidelity during training ({table}_fidelity.png): EP's gradient against "
            "backprop's on the same batch and weights, the worst parameter tensor, mean over seeds")
    if not twice:
        return ["", text + ", mean of the checks (every run was checked in one epoch only).", "",
                "| cell | epoch checked | cosine | rel. error |", "|---|---|---|---|", *rows]
    return ["", text + ", mean of the checks in the first and the last epoch checked (—: checked "
            "in one epoch only).", "",
            "| cell | epochs checked | cosine (first epoch) | cosine (last epoch) | "
            "rel. error (first epoch) | rel. error (last epoch) |", "|---|---|---|---|---|---|",
            *rows]


# -- figures ------------------------------------------------------------------------------------
def _heatmap(ax, cells: dict, rows: str, cols: str, title: str | None) -> None:
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
                color="red" if math.isnan(v) else "white", fontsize=10)
    ax.set_xticks(range(len(col_values)), [str(v) for v in col_values])
    ax.set_yticks(range(len(row_values)), [str(v) for v in row_values])
    ax.set_xlabel(words(cols))
    ax.set_ylabel(words(rows))
    if title:
        ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label=words("test/top1_error"))


def _facets(cells: dict, key: str | None) -> dict:
    groups: dict = {}
    for k, c in cells.items():
        groups.setdefault(c["labels"].get(key) if key else None, {})[k] = c
    return groups


def _bars(ax, cells: dict, x: str, hue: str, title: str | None) -> None:
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
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top * 1.45)   # headroom for the legend, without ticks above the data's own
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= top])
    ax.set_xlabel(words(x))
    ax.set_ylabel(words("test/top1_error"))
    if title:
        ax.set_title(title)
    ax.legend(title=words(hue), fontsize=10, title_fontsize=10, loc="upper center",
              ncol=len(hues))


def _distinct(curves: list[list[float]]) -> int:
    """How many of the curves can be told apart: equal to 1/200 of their range (about a pixel of
    a panel), two curves are drawn on the same pixels."""
    low, high = min(map(min, curves)), max(map(max, curves))
    span = (high - low) or 1.0
    return len({tuple(round(200 * (v - low) / span) for v in c) for c in curves})


def _energy(axes, run: Run) -> None:
    """One panel per rule and sign of β, as Fig. 8: F(K) per image (thin) and their mean; a panel
    where images give the same curve says how many curves show. K counts whole iterations, so do
    its ticks. The legend goes below the panels (``_legend``), off the curves."""
    from matplotlib.ticker import MaxNLocator

    for ax, (name, c) in zip(axes.flat, run.energy["curves"].items()):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        n, distinct = len(c["per_image"]), _distinct(c["per_image"])
        for j, per_image in enumerate(c["per_image"]):
            ax.plot(run.energy["K"], per_image, color="gray", alpha=0.4, lw=0.8,
                    label=None if j else "each image (grey)")
        ax.plot(run.energy["K"], c["mean"], color="tab:blue", lw=2, label="mean over images")
        ax.axvline(run.energy["K_config"], color="tab:red", lw=0.8, label="K of training")
        rule, sign = name.split("/")
        shown = f" ({distinct} distinct curves of {n} images)" if distinct < n else ""
        ax.set_title(f"{rule}, β = {sign}{run.energy['beta']}{shown}")
        ax.set_xlabel("Nudge iteration K")
        ax.set_ylabel("F = E + βC")


def _paper_value(rows: list, labels: dict, key: str) -> float | None:
    match = next((p for p in rows if _matches(p, labels)), {})
    value = match.get(key)
    return value[0] if isinstance(value, list) else value


# A cell's look in a curve figure: colour C{i % 10}, marker MARKERS[i // 10], so no two of up to
# 60 cells look alike (Table 6's figure has 24). "D" is kept for the final test error.
MARKERS = ("o", "s", "^", "v", "P", "X")


def _look(i: int, labels: dict) -> dict:
    """How cell ``i`` is drawn. BP goes under EP, dashed, wide and half transparent, with hollow
    markers a size larger: where EP's curve coincides with BP's (Fig. 3: they often do), EP's line
    and markers stay visible inside BP's."""
    look = {"color": f"C{i % 10}", "marker": MARKERS[i // 10 % len(MARKERS)]}
    if labels.get("method") == "bp":
        return {**look, "ls": "--", "lw": 3.2, "alpha": 0.55, "ms": 8, "mfc": "none", "mew": 1.6,
                "zorder": 2}
    return {**look, "ls": "-", "lw": 1.5, "ms": 4.5, "zorder": 3}


def _points(cell: dict, metric: str) -> dict:
    """{epoch: [value per run]} of a cell's runs that ended ok or diverged; errors in %."""
    points: dict = defaultdict(list)
    for run in cell["runs"]:
        if run.status in ("ok", "diverged"):
            for epoch, v in run.curves.get(metric, {}).items():
                points[epoch].append(v if metric in FIDELITY else 100 * v)
    return points


def _fidelity_range(ax, metric: str, values: list[float], axis: str = "y") -> None:
    """A fidelity axis spans at least 0.99–1 (cosine) or 0–0.1 (relative error): autoscaled to
    0.99986–0.99996, equal values would look far apart. Relative errors spanning more than two
    decades get a log axis."""
    if not values:
        return
    if metric != "fidelity/min_cosine" and min(values) > 0 and max(values) > 100 * min(values):
        # relative errors over more than two decades (0.02 beside 60 for a diverging α = 1):
        # on a linear axis every value but the largest would sit at 0
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return
    if metric == "fidelity/min_cosine":
        low, high = min(min(values), 0.99), 1.0
    else:
        low, high = 0.0, max(max(values), 0.1)
    pad = 0.06 * (high - low)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(low - pad, high + pad)


def _dodge(rank: int, n: int, epochs: int) -> float:
    """How far (in epochs) the ``rank``-th of ``n`` curves is moved: together they spread over at
    most 0.3 epoch, or 3 % of an axis of many epochs, centred on the epoch."""
    step = min(0.08, 0.3 / max(n - 1, 1)) * max(1.0, epochs / 10)
    return (rank - (n - 1) / 2) * step


def _curves(ax, cells: dict, metric: str, paper_rows: list, facet: str | None = None) -> list:
    """One line per cell (``_look``: BP dashed, under EP); ◆ the cell's final test error at its
    last epoch (BP's hollow and larger), the paper's final test error as a dotted line in the
    cell's colour. Errors are drawn in %, fidelity/* (cosines, relative errors) as logged. The
    cells stand side by side around each epoch (``_dodge``): equal values (four PGD cells of a
    smoke run) would otherwise draw every marker on one spot, the last one drawn hiding the rest."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    key, finals, papers, last, drawn = PAPER_KEY.get(metric), False, False, 0, []
    shown = [i for i, c in enumerate(cells.values()) if _points(c, metric)]
    span = max((e + 1 for c in cells.values() for e in _points(c, metric)), default=1)
    for i, c in enumerate(cells.values()):
        points = _points(c, metric)
        if not points:
            continue
        epochs, look = sorted(points), _look(i, c["labels"])
        shift = _dodge(shown.index(i), len(shown), span)
        xs = [e + 1 + shift for e in epochs]  # epoch 1 is the first
        label = ", ".join(f"{k}={v}" for k, v in c["labels"].items() if k != facet)
        ys = [statistics.mean(points[e]) for e in epochs]
        ax.plot(xs, ys, label=label, **look)   # a marker: a one-epoch curve is still seen
        drawn += ys
        last = max(last, epochs[-1] + 1)
        final = [v for v in c.get(key, []) if not math.isnan(v)] if key else []
        if final:
            bp = c["labels"].get("method") == "bp"
            ax.plot(xs[-1], statistics.mean(final), "D", color=look["color"], ms=11 if bp else 7,
                    mfc="none" if bp else look["color"], mec=look["color"] if bp else "black",
                    mew=2 if bp else 1, zorder=look["zorder"] + 2)
            finals = True
        reference = _paper_value(paper_rows, c["labels"], key) if key else None
        if reference is not None:
            ax.axhline(reference, color=look["color"], ls=":", lw=1.6)
            papers = True
    ax.set_xlabel("Epoch")
    if last:   # whole epochs, a one-epoch curve in the middle
        ax.set_xlim(0.5, last + 0.5)
    # min_n_ticks=1: with its default 2, a range holding one integer falls back to 0.6, 0.7, …
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if metric in FIDELITY:
        _fidelity_range(ax, metric, drawn)
    ax.set_ylabel(words(metric))
    return ([Line2D([], [], color="gray", marker="D", ls="none", mec="black",
                    label="final test error (the table; BP's hollow)")] * finals
            + [Line2D([], [], color="gray", ls=":", lw=1.6, label="the paper's final test error")]
            * papers)


def _legend(fig, axes, extra: list) -> float | None:
    """One legend for every panel, below them (the panels share their cells' labels); the figure
    grows by its rows."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    for h in extra:
        handles.setdefault(h.get_label(), h)
    if not handles:
        return
    # As many columns as the longest label (and its 40 pt line sample) lets fit across the figure.
    longest = max(len(label) for label in handles)
    ncol = max(1, min(3, len(handles), _characters_across(fig, 10) // (longest + 7)))
    rows = math.ceil(len(handles) / ncol)
    fig.set_figheight(fig.get_figheight() + 0.3 * rows)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=10,
               frameon=False, bbox_to_anchor=(0.5, 0.4 / fig.get_figheight()))
    return 0.45 + 0.3 * rows


def _characters_across(fig, font_size: float) -> int:
    """How many characters of ``font_size`` pt fit across the figure (a character is ~0.6 of the
    size wide; the 11 pt bold banner counts as 12 pt)."""
    return int(fig.get_figwidth() * 72 / (0.6 * font_size))


def _grid(n: int, width: float = 6.4, height: float = 4.6):
    """Panels two to a row: never a long strip."""
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    return rows, cols, (width * cols, height * rows)


def build_figure(table: str, runs: list[Run], cells: dict, paper: dict | None = None,
                 smoke: bool = False):
    """The table's figure (a matplotlib Figure), or None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = paper_results() if paper is None else paper
    bottom = 0.45   # inches kept below the panels for the caption (and the legend)
    rows_of_paper = paper.get(table, {}).get("rows", [])
    if table in ("table_beta_K", "fig_traversal", "table_schemes"):
        facet = {"table_beta_K": None, "fig_traversal": "order", "table_schemes": "dataset"}[table]
        groups = _facets(cells, facet)
        nrows, ncols, size = _grid(len(groups))
        fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
        for ax, (name, group) in zip(axes.flat, groups.items()):
            title = f"{words(facet)}: {name}" if facet else None
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
        bottom = _legend(fig, axes.flat, []) or bottom
    else:
        if not any(r.curves for r in runs):
            return None
        facet, metrics = CURVES.get(table, (None, None))[0], curve_metrics(table)
        metrics = [m for m in metrics if any(m in r.curves for r in runs)] or metrics[:1]
        groups = _facets(cells, facet)
        panels = [(name, group, m) for name, group in groups.items() for m in metrics]
        nrows, ncols, size = _grid(len(panels))
        fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
        extra = []
        for ax, (name, group, metric) in zip(axes.flat, panels):
            extra += _curves(ax, group, metric, rows_of_paper, facet)
            if facet:
                ax.set_title(f"{words(facet)}: {name}")
        bottom = _legend(fig, axes.flat, extra) or bottom
    return _finish(fig, axes, title_of(table), caption(table, paper, smoke),
                   smoke and smoke_banner(table, runs), bottom)


def _checked(cell: dict) -> int:
    """How many epochs of the cell's runs the fidelity monitor checked."""
    return len(_points(cell, FIDELITY[0]))


def build_fidelity_figure(table: str, runs: list[Run], cells: dict, smoke: bool = False):
    """The gradient-fidelity monitor's figure: worst-tensor cosine and relative error per epoch,
    one line per EP cell; one dot per cell (``_dots``) when no cell was checked in two epochs, as
    a line needs two points. None when no run logged it."""
    if not has_fidelity(runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checked = {k: c for k, c in cells.items() if _checked(c)}
    if all(_checked(c) < 2 for c in checked.values()):
        fig, axes = plt.subplots(1, 2, figsize=(12.8, 2.8 + 0.3 * len(checked)), sharey=True,
                                 squeeze=False)
        for ax, metric in zip(axes.flat, FIDELITY):
            _dots(ax, checked, metric)
        return _finish(fig, axes, f"{title_of(table)}: gradient fidelity during training",
                       FIDELITY_DOTS_CAPTION, smoke and SMOKE_BANNER, 0.8)
    fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.6), squeeze=False)
    for ax, metric in zip(axes.flat, FIDELITY):
        _curves(ax, cells, metric, [])
    bottom = _legend(fig, axes.flat, []) or 0.45
    return _finish(fig, axes, f"{title_of(table)}: gradient fidelity during training",
                   FIDELITY_CAPTION, smoke and SMOKE_BANNER, bottom)


def _dots(ax, cells: dict, metric: str) -> None:
    """One row per cell, in the table's order: the mean of its checks over its runs, the value
    written beside the dot (the cell is named on the row: no legend, no colours to tell apart)."""
    names = [", ".join(f"{k}={v}" for k, v in c["labels"].items()) for c in cells.values()]
    values = [statistics.mean(v for vs in _points(c, metric).values() for v in vs)
              for c in cells.values()]
    rows = range(len(values))
    ax.plot(values, rows, "o", color="C0", ms=6, ls="none")
    ax.set_yticks(list(rows), names, fontsize=9)
    ax.set_ylim(len(values) - 0.5, -0.5)   # the first cell on top
    ax.grid(axis="y", color="0.9")
    _fidelity_range(ax, metric, values, axis="x")
    low, high = ax.get_xlim()
    middle = math.sqrt(low * high) if ax.get_xscale() == "log" else (low + high) / 2
    for row, v in zip(rows, values):   # the value on the side with room
        right = v < middle
        ax.annotate(f"{v:.5f}" if metric == "fidelity/min_cosine" else f"{v:.3g}", (v, row),
                    xytext=(7 if right else -7, 0), textcoords="offset points", va="center",
                    ha="left" if right else "right", fontsize=8)
    epochs = sorted({e + 1 for c in cells.values() for e in _points(c, metric)})
    ax.set_title(f"checked in epoch {', '.join(map(str, epochs))}", fontsize=10)
    ax.set_xlabel(words(metric))


def _finish(fig, axes, title: str, text: str, banner: str | None, bottom: float):
    """Title (and the smoke ``banner``) above the panels, the caption below them; empty panels
    hidden. ``bottom``: inches kept below the panels for the caption and legend."""
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    height = fig.get_figheight()
    smoke = bool(banner)
    banner = textwrap.fill(banner, _characters_across(fig, 12)) if smoke else ""
    top = 0.45 + 0.3 * (banner.count("\n") + 1) * smoke   # inches for the title (and the banner)
    fig.suptitle(title, fontsize=14, y=1 - 0.12 / height, va="top")
    if smoke:
        fig.text(0.5, 1 - 0.55 / height, banner, ha="center", va="top", fontsize=11,
                 color="white", weight="bold", bbox={"facecolor": "firebrick", "edgecolor": "none"})
    fig.text(0.5, 0.1 / height, text, ha="center", va="bottom", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - top / height))
    return fig


def figure(table: str, runs: list[Run], cells: dict, path: Path, paper: dict | None = None,
           smoke: bool = False, fidelity: bool = False) -> Path | None:
    """Save the table's figure (``fidelity``: its gradient-fidelity figure) to ``path``."""
    import matplotlib.pyplot as plt

    fig = (build_fidelity_figure(table, runs, cells, smoke) if fidelity
           else build_figure(table, runs, cells, paper, smoke))
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry points -------------------------------------------------------------------------------
def collect(results: Path, smoke: bool | None = None, warn=warn) -> tuple[bool, dict, dict]:
    """The runs of the results root ``results`` by table: (smoke?, {table: runs reported},
    {table: number of runs of the other kind left out}). ``smoke``: report the smoke (True) or
    real (False) runs; default: what ``reproduce`` marked the root as, else real runs if there are
    any, else smoke runs. ``warn``: where the lines on skipped runs go."""
    everything = read_runs(results, warn)
    if not everything:
        nested = nested_roots(results)
        hint = f" (other results roots inside it: {', '.join(map(str, nested))})" if nested else ""
        raise FileNotFoundError(f"no runs (run.json or W&B run folders) under {results}{hint}")
    smoke, runs, left = split_kind(everything, root_kind(results, warn) if smoke is None else smoke)
    by_table: dict[str, list[Run]] = defaultdict(list)
    left_by_table: dict[str, int] = defaultdict(int)
    for run in runs:
        by_table[run.table].append(run)
    for run in left:
        left_by_table[run.table] += 1
    return smoke, by_table, left_by_table


def write_report(results: Path, out: Path, tables: list[str] | None = None,
                 smoke: bool | None = None) -> list[Path]:
    """Write TABLE.md, TABLE.png and (where EP runs logged the fidelity monitor)
    TABLE_fidelity.png for every table with runs of the results root ``results`` (``smoke`` as in
    ``collect``); return the paths."""
    smoke, by_table, left_by_table = collect(results, smoke)
    paper = paper_results()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables or sorted(by_table):
        if table not in by_table:
            other = (f" ({left_by_table[table]} {'real' if smoke else 'smoke'} runs left out: "
                     "smoke and real runs are never reported together)") if left_by_table[table] else ""
            raise FileNotFoundError(f"no {'smoke' if smoke else 'real'} runs of {table} under "
                                    f"{results}{other}")
        table_runs, md = by_table[table], output_path(out, f"{table}.md")
        cells = summarize(table_runs)
        md.write_text(markdown(table, table_runs, cells, paper, smoke, left_by_table[table]))
        written.append(md)
        for png in (figure(table, table_runs, cells, output_path(out, f"{table}.png"), paper,
                           smoke),
                    figure(table, table_runs, cells, output_path(out, f"{table}_fidelity.png"),
                           smoke=smoke, fidelity=True)):
            if png:
                written.append(png)
    return written


def reported(results: Path, tables: list[str] | None = None,
             smoke: bool | None = None) -> tuple[bool, list[str]]:
    """The kind and the tables of the report ``write_report`` makes of ``results`` (for
    ``--publish``); quiet, as ``write_report`` already warned about the runs it skipped."""
    smoke, by_table, _ = collect(results, smoke, warn=lambda message: None)
    return smoke, list(tables or sorted(by_table))


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pcn_ep report", description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path,
                   help="the results folder reproduce wrote (RESULTS_DIR: one folder per table)")
    p.add_argument("--out", type=Path, required=True,
                   help="the folder to write the tables (Markdown) and figures (PNG) into")
    p.add_argument("--tables", nargs="+", default=None,
                   help="the tables to report (default: every table found)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--smoke", dest="smoke", action="store_const", const=True, default=None,
                      help="report the smoke runs (default: the folder's kind, else real runs if any)")
    kind.add_argument("--real", dest="smoke", action="store_const", const=False,
                      help="report the real (non-smoke) runs")
    p.add_argument("--publish", action="store_true",
                   help="also build the W&B Report (one section per table); without a W&B key or "
                        "network, write its specification to OUT_DIR/wandb_report.json")
    p.add_argument("--wandb-project", default="pcn-ep",
                   help="the project the runs were logged to (reproduce's --wandb-project)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Bad input is one ``pcn_ep: error:`` line: results folder missing or a file (exit 1),
    ``--out`` an existing file (exit 2, a bad option value), writing refused (exit 1)."""
    p = parser()
    args = p.parse_args(argv)
    if not args.results.is_dir():
        what = f"{args.results} is not a folder" if args.results.exists() else \
            f"not found: {args.results}"
        print(f"pcn_ep: error: results folder {what}", file=sys.stderr)
        return 1
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    try:
        paths = write_report(args.results, args.out, args.tables, args.smoke)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"pcn_ep: error: {err}".replace("\n", "\\n"), file=sys.stderr)
        return 1
    except OSError as err:   # --out not writable, or a folder inside it is in a file's way
        print(f"pcn_ep: error: cannot write the report to {err.filename or args.out}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    if args.publish:
        from .wandb_report import publish_or_describe

        try:
            smoke, tables = reported(args.results, args.tables, args.smoke)
            line, code = publish_or_describe(args.results, args.out, tables, smoke,
                                             args.wandb_project)
        except (ValueError, OSError) as err:   # its specification refused, as the tables above
            line, code = f"pcn_ep: error: {err}", 1
        print(line, file=sys.stderr if code else sys.stdout)
        return code
    return 0

"""``report`` is safe on anyone's results folder (issue 23): names read from run files never take a
write outside ``--out``, and a bad run file, a truncated ``.wandb`` file or a bad folder is one
``pcn_ep:`` line, never a traceback. No training: fake ``run.json`` + ``metrics.csv`` folders, and
real ``.wandb`` files written by wandb offline in one subprocess."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pcn_ep.experiments import report

COSTS = {"dataset": "mnist", "cost": "mse", "method": "ep"}


def _record(folder, table="table_costs", cell=COSTS, seed=0, status="ok", **extra):
    """A run folder as ``reproduce`` leaves it (``extra`` overrides or adds run.json keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(
        {"table": table, "cell": cell, "seed": seed, "status": status, "smoke": False, **extra}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["epoch", "val/top1_error", "test/top1_error"], [0, 0.5, ""],
                          [1, "", 0.004]])
    return folder


def _files(root, but=None):
    """Every path under ``root`` (not under ``but``)."""
    return {p for p in root.rglob("*") if but is None or but not in (p, *p.parents)}


def _report(capsys, *argv):
    """(exit code, stderr lines) of ``python -m pcn_ep report ARGV``, in this process."""
    try:
        code = report.main([str(a) for a in argv])
    except SystemExit as stop:   # the parser's one-line errors
        code = stop.code
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("pcn_ep: ") for line in err), err   # one line each, no traceback
    return code, err


# -- names from files never leave --out ---------------------------------------------------------
def _escapes(tmp_path):
    """Table and cell names a results folder could hold: `..`, absolute paths, separators, hidden
    and empty names."""
    outside = tmp_path / "outside"
    return [{"table": "../../../escaped"}, {"table": str(outside / "escaped")},
            {"table": "sub/escaped"}, {"table": ".."}, {"table": ".hidden"}, {"table": ""},
            {"table": "a\\b"}, {"table": "x" * 300},
            {"cell": {"dataset": "../../../escaped", "cost": "mse", "method": "ep"}},
            {"cell": {"../escaped": "mnist", "cost": "mse", "method": "ep"}},
            {"cell": {"dataset": str(outside / "escaped"), "cost": "mse", "method": "ep"}},
            {"cell": {"dataset": "mnist|x", "cost": "mse", "method": "ep"}}]


def test_names_from_run_files_never_write_outside_out(tmp_path, capsys):
    """The finding: ``"table": "../../../x"`` and an absolute table name wrote ``x.md`` there."""
    results, out = tmp_path / "a" / "b" / "results", tmp_path / "a" / "b" / "report"
    _record(results / "good")
    bad = [_record(results / f"bad{i}", **names) for i, names in enumerate(_escapes(tmp_path))]
    before = _files(tmp_path)
    code, err = _report(capsys, results, "--out", out)
    assert code == 0
    assert _files(tmp_path, but=out) == before            # nothing new outside --out
    assert sorted(p.name for p in out.iterdir()) == ["table_costs.md", "table_costs.png"]
    for folder in bad:   # each skipped run named once, in one warning line
        assert sum(str(folder / "run.json") in line for line in err) == 1
    assert len(err) == len(bad) and all(line.startswith("pcn_ep: warning:") for line in err)
    assert "| 1 | ok | 0.40 |" in (out / "table_costs.md").read_text()


@pytest.mark.parametrize("name", ["table_costs.md", "table_costs.png"])
def test_a_symlink_planted_in_out_is_not_written_through(tmp_path, capsys, name):
    """The final resolved path must lie inside --out: a link there pointing out is refused."""
    _record(tmp_path / "results" / "good")
    out, target = tmp_path / "report", tmp_path / "outside.txt"
    out.mkdir()
    (out / name).symlink_to(target)
    code, err = _report(capsys, tmp_path / "results", "--out", out)
    assert code == 1 and not target.exists()
    assert len(err) == 1 and err[0].startswith("pcn_ep: error:") and str(out / name) in err[0]


def test_the_w_and_b_specification_is_not_written_through_a_symlink(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _record(tmp_path / "results" / "good")
    out, target = tmp_path / "report", tmp_path / "outside.json"
    out.mkdir()
    (out / "wandb_report.json").symlink_to(target)
    code, err = _report(capsys, tmp_path / "results", "--out", out, "--publish")
    assert code == 1 and not target.exists() and len(err) == 1 and "wandb_report.json" in err[0]


# -- W&B run folders ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    """Real offline W&B run files, as reproduce's runs log them (group = table, config.cell):
    {name: path of its .wandb file}. No status in the summary: a whole file reads ``unknown``."""
    root = tmp_path_factory.mktemp("wandb")
    outside = root / "outside"
    script = textwrap.dedent(f"""
        import wandb
        groups = {{"good": "table_costs", "dotdot": "../../../escaped",
                  "absolute": {str(outside / "escaped")!r}, "separator": "sub/escaped"}}
        for name, group in groups.items():
            run = wandb.init(project="p", group=group, dir={str(root)!r} + "/" + name,
                             config={{"table": group, "cell": {COSTS!r}, "seed": 0,
                                     "smoke": False}})
            for epoch in range(3):
                run.log({{"epoch": epoch, "val/top1_error": 0.5 - 0.1 * epoch}})
            run.log({{"test/top1_error": 0.3}})
            run.finish()
    """)
    names = ("good", "dotdot", "absolute", "separator")
    for name in names:
        (root / name).mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return {name: next((root / name).rglob("run-*.wandb")) for name in names}


def _wandb_results(tmp_path, wandb_runs, name, cut=None):
    """A results root holding one W&B run folder (its file cut to ``cut`` bytes)."""
    data = wandb_runs[name].read_bytes()
    folder = tmp_path / "results" / name / "wandb" / "offline-run-x"
    folder.mkdir(parents=True)
    (folder / "run-x.wandb").write_bytes(data[:cut] if cut is not None else data)
    return folder / "run-x.wandb"


@pytest.mark.parametrize("name", ["dotdot", "absolute", "separator"])
def test_a_w_and_b_group_never_writes_outside_out(tmp_path, capsys, wandb_runs, name):
    wandb_file = _wandb_results(tmp_path, wandb_runs, name)
    _record(tmp_path / "results" / "good")
    out = tmp_path / "results" / "report"
    before = _files(tmp_path.parent)
    code, err = _report(capsys, tmp_path / "results", "--out", out)
    assert code == 0 and _files(tmp_path.parent, but=out) == before
    assert len(err) == 1 and err[0].startswith("pcn_ep: warning:") and str(wandb_file) in err[0]


def test_a_whole_wandb_file_reads_as_before(tmp_path, wandb_runs):
    wandb_file = _wandb_results(tmp_path, wandb_runs, "good")
    run = report.read_wandb_run(wandb_file.parent)
    assert (run.table, run.status) == ("table_costs", "unknown")
    assert run.curves["val/top1_error"] == pytest.approx({0: 0.5, 1: 0.4, 2: 0.3})


def test_a_truncated_wandb_file_is_read_up_to_the_cut_and_breaks_no_table(tmp_path, capsys,
                                                                           wandb_runs):
    """The finding: a killed run's .wandb file raised protobuf's DecodeError and no table was
    reported. Cut anywhere, the records before the cut are read (no exit record: ``running``, no
    numbers), or the run is skipped if not even its own record survived; one warning line names
    the file, and the other runs are reported."""
    size = wandb_runs["good"].stat().st_size
    for cut in [0, 3, 7, 8, 100, *range(300, size, 173), size - 1]:
        root = tmp_path / str(cut)
        wandb_file = _wandb_results(root, wandb_runs, "good", cut)
        _record(root / "results" / "local", seed=1)
        out = root / "report"
        code, err = _report(capsys, root / "results", "--out", out)
        md = (out / "table_costs.md").read_text()
        assert code == 0 and "| 0.40 |" in md, cut           # the readable run is still reported
        assert len(err) <= 1 and all(str(wandb_file) in line for line in err), (cut, err)
        assert " ok,unknown " not in md                       # never the whole run's status
    assert "| mnist | mse | ep | 2 | ok,running |" in md     # the cut run's first records count
    run = report.read_wandb_run(wandb_file.parent)
    assert run.status == "running" and run.curves["val/top1_error"]


def test_a_cut_wandb_file_yields_only_whole_records(wandb_runs):
    """Cut anywhere (every 3rd byte), the records read are the first ones of the whole file, never
    a record cut short that happened to decode; a cut that is not between records is said."""
    data = wandb_runs["good"].read_bytes()
    whole = [r.SerializeToString() for r in report._wandb_records(wandb_runs["good"])]
    path = wandb_runs["good"].parent.parent / "cut.wandb"
    boundaries = 0
    for cut in range(7, len(data), 3):
        path.write_bytes(data[:cut])
        read = []
        try:
            read.extend(r.SerializeToString() for r in report._wandb_records(path))
            boundaries += 1
        except report.Unreadable:
            pass
        assert read == whole[:len(read)], cut
    assert boundaries <= len(whole)   # only cuts between records read without a word


def test_garbage_after_the_header_skips_the_run_with_one_line(tmp_path, capsys, wandb_runs):
    header = wandb_runs["good"].read_bytes()[:7]
    for i, junk in enumerate([b"\xff" * 64, b"\x00\x00\x00\x00\x10\x00\x01" + b"\xff" * 16]):
        folder = tmp_path / str(i) / "results" / "wandb" / "offline-run-x"
        folder.mkdir(parents=True)
        (folder / "run-x.wandb").write_bytes(header + junk)
        _record(tmp_path / str(i) / "results" / "local")
        code, err = _report(capsys, tmp_path / str(i) / "results", "--out", tmp_path / str(i) / "o")
        assert code == 0 and len(err) == 1 and "run-x.wandb" in err[0] and "skipped" in err[0]


# -- run files that are not runs ----------------------------------------------------------------
def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())


def _replace(folder, name, make):
    """A good run whose ``name`` file is replaced by what ``make(path)`` puts there."""
    _record(folder)
    (folder / name).unlink()
    make(folder / name)


# Run folders whose files cannot be read as a run, each a different way.
BAD_RUNS = {
    "a list": lambda d: _write(d, "run.json", '["table", "cell", "seed", "status"]'),
    "a string": lambda d: _write(d, "run.json", '"table cell seed status"'),
    "not JSON": lambda d: _write(d, "run.json", '{"table": '),
    "empty": lambda d: _write(d, "run.json", ""),
    "not UTF-8": lambda d: _write(d, "run.json", b"\xff\xfe{}"),
    "nested too deeply": lambda d: _write(d, "run.json", "[" * 100_000 + "]" * 100_000),
    "missing keys": lambda d: _write(d, "run.json", '{"table": "table_costs"}'),
    "seed a string": lambda d: _record(d, seed="0"),
    "seed a fraction": lambda d: _record(d, seed=0.5),
    "status unknown": lambda d: _record(d, status="great"),
    "smoke a string": lambda d: _record(d, smoke="yes"),
    "cell a list": lambda d: _record(d, cell=["mnist"]),
    "cell a nested dict": lambda d: _record(d, cell={**COSTS, "dataset": {"a": 1}}),
    "cell NaN": lambda d: _record(d, table="table_beta_K", cell={"beta": float("nan"), "K": 1}),
    "cell not of its table": lambda d: _record(d, table="table_beta_K", cell={"beta": "x"}),
    "run.json a folder": lambda d: (d / "run.json").mkdir(parents=True),
    "metrics garbage": lambda d: _replace(d, "metrics.csv", lambda p: p.write_text(
        "epoch,val/top1_error\n0,abc\n")),
    "metrics epoch inf": lambda d: _replace(d, "metrics.csv", lambda p: p.write_text(
        "epoch,val/top1_error\ninf,0.1\n")),
    "metrics extra field": lambda d: _replace(d, "metrics.csv", lambda p: p.write_text(
        "epoch,val/top1_error\n0,0.1,7\n")),
    "metrics NUL": lambda d: _replace(d, "metrics.csv", lambda p: p.write_bytes(
        b"epoch,val/top1_error\n0,0.1\x00\n")),
    "metrics a FIFO": lambda d: _replace(d, "metrics.csv", os.mkfifo),   # reading would block
    "metrics a folder": lambda d: _replace(d, "metrics.csv", lambda p: p.mkdir()),
    "energy garbage": lambda d: (_record(d, table="fig_energy", cell={"model": "vgg10"}),
                                 _write(d, "energy.json", '{"curves": {"x": 1}}')),
}


@pytest.mark.parametrize("what", BAD_RUNS)
def test_a_run_file_that_is_not_a_run_is_skipped_with_one_warning(tmp_path, capsys, what):
    """The finding: a run.json that is a list was a traceback; every such run is now skipped with
    one warning naming it, and the good run beside it is read."""
    BAD_RUNS[what](tmp_path / "results" / "bad")
    _record(tmp_path / "results" / "good")
    runs = report.read_runs(tmp_path / "results")
    assert [r.seed for r in runs] == [0] and runs[0].final == {"test/top1_error": 0.004}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("pcn_ep: warning:"), err
    assert str(tmp_path / "results" / "bad" / "run.json") in err[0]
    if what.startswith("metrics"):   # and the file at fault, and where in it
        assert str(tmp_path / "results" / "bad" / "metrics.csv") in err[0]
        assert "FIFO" in what or "folder" in what or "line 2:" in err[0]


def test_all_bad_runs_at_once_still_give_the_report(tmp_path, capsys):
    bad = []
    for i, make in enumerate(BAD_RUNS.values()):
        make(tmp_path / "results" / f"bad{i}")
        bad.append(tmp_path / "results" / f"bad{i}" / "run.json")
    _record(tmp_path / "results" / "good")
    code, err = _report(capsys, tmp_path / "results", "--out", tmp_path / "out")
    assert code == 0 and len(err) == len(bad)
    assert all(sum(str(p) in line for line in err) == 1 for p in bad)
    assert "| 1 | ok | 0.40 |" in (tmp_path / "out" / "table_costs.md").read_text()


def test_only_bad_runs_is_one_error_line(tmp_path, capsys):
    (tmp_path / "results" / "a").mkdir(parents=True)
    (tmp_path / "results" / "a" / "run.json").write_text("[]")
    code, err = _report(capsys, tmp_path / "results", "--out", tmp_path / "out")
    assert code == 1 and err[-1].startswith("pcn_ep: error: no runs") and len(err) == 2


def test_a_marker_that_is_not_reproduces_is_a_warning(tmp_path, capsys):
    _record(tmp_path / "results" / "good")
    (tmp_path / "results" / report.MARKER).write_text("[1]")
    code, err = _report(capsys, tmp_path / "results", "--out", tmp_path / "out")
    assert code == 0 and len(err) == 1 and report.MARKER in err[0]


# -- bad folders --------------------------------------------------------------------------------
def test_out_an_existing_file_is_one_error_line_and_the_file_is_kept(tmp_path, capsys):
    _record(tmp_path / "results" / "good")
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, err = _report(capsys, tmp_path / "results", "--out", out)
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "is a file" in err[0]
    assert out.read_text() == "mine"


def test_bad_results_and_out_folders_are_one_error_line(tmp_path, capsys):
    _record(tmp_path / "results" / "good")
    (tmp_path / "file").write_text("x")
    for results, out, says in [(tmp_path / "missing", tmp_path / "o", "not found"),
                               (tmp_path / "file", tmp_path / "o", "is not a folder"),
                               (tmp_path / "results", tmp_path / "file" / "o", "cannot write")]:
        code, err = _report(capsys, results, "--out", out)
        assert code == 1 and len(err) == 1 and says in err[0], err
        assert str(out if says == "cannot write" else results) in err[0]

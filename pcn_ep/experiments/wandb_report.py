"""The W&B Report of a results root (``python -m pcn_ep report RESULTS --out OUT --publish``).

One section per paper table: its title, our table beside the paper's numbers (the Markdown that
``report`` writes), run-set panels over the table's W&B runs, and our figure. A run set selects
the runs ``reproduce`` logged for the table: W&B group = the table's name, config ``smoke`` = the
report's kind, so smoke and real runs never share a panel (as in the Markdown report).

The Report is first written down as plain data, its *specification* (``OUT/wandb_report.json``):
it needs no W&B login, so it is written offline too, and is what tests check. Publishing turns it
into ``wandb-workspaces`` blocks: the figures are logged to one W&B run (job type ``report``) and
shown by a media panel; resolving run sets and saving need a login and the network.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .results import (CONFIGS, FIDELITY, SMOKE_BANNER, curve_metrics, output_path, title_of,
                      words)
from .tables import TABLES

SPEC = "wandb_report.json"


def runs_in_wandb(table: str) -> bool:
    """Only ``fit`` runs log to W&B (Fig. 8's energy tool writes a JSON file)."""
    return any(cell.command == "fit" for cell in TABLES[table].cells())


def logs_fidelity(table: str) -> bool:
    """Whether a fit run of the table has the gradient-fidelity monitor (every EP config does)."""
    return any(cell.command == "fit" and "GradientFidelity" in (CONFIGS / cell.config).read_text()
               for cell in TABLES[table].cells())


def panels(table: str) -> list[dict]:
    """The run-set panels of a table: the error curves its figure draws (per epoch, each run a
    line), the gradient-fidelity monitor's worst cosine and relative error for tables with EP runs,
    and for Fig. 2 the runs over β × K with their final test error (a scatter panel over the runs,
    the error its third axis: W&B's built-in panels have no heat map; ours is the figure)."""
    found = [{"kind": "line",
              "title": f"{words(metric).replace(' (%)', '')} per epoch (fraction)",
              "x": "epoch", "y": metric}
             for metric in curve_metrics(table)]
    if logs_fidelity(table):
        found += [{"kind": "line", "title": f"{words(metric)} per epoch", "x": "epoch",
                   "y": metric} for metric in FIDELITY]
    if table == "table_beta_K":
        found.insert(0, {"kind": "grid", "title": "β × K: final test top-1 error (fraction)",
                         "x": "cell.beta", "y": "cell.K", "value": "test/top1_error"})
    return found


def run_filter(table: str, smoke: bool) -> str:
    """W&B's filter expression for the table's runs: the group and the smoke flag that
    ``reproduce.run_overlay`` gives every run of the table."""
    return f"Metric(\"Group\") == '{table}' and Config(\"smoke\") == {smoke}"


def specification(results: Path, out: Path, tables: list[str], smoke: bool,
                  project: str = "pcn-ep") -> dict:
    """The Report as plain data, from the Markdown and figures ``write_report`` left in ``out``
    for ``tables`` (those it reported: ``report.reported``) of the kind ``smoke``."""
    sections = []
    for table in [t for t in TABLES if t in tables]:   # in the paper's order
        md = (out / f"{table}.md").read_text()
        png, fidelity_png = out / f"{table}.png", out / f"{table}_fidelity.png"
        sections.append({
            "table": table, "title": title_of(table),
            "markdown": md.split("\n", 1)[1].strip(),  # the title is the section's heading
            "runset": {"name": table, "project": project, "filters": run_filter(table, smoke)}
            if runs_in_wandb(table) else None,
            "panels": panels(table) if runs_in_wandb(table) else [],
            "figures": [{"file": p.name, "key": f"figures/{p.stem}"}
                        for p in (png, fidelity_png) if p.exists()]})
    kind = " (smoke runs)" if smoke else ""
    return {
        "title": f"pcn-ep: Kerjan, Høier & Scellier (2026), table by table{kind}",
        "description": ((SMOKE_BANNER + ". ") if smoke else "")
        + "Our results beside the paper's; each section's panels show the table's W&B runs "
          "(group = the table).",
        "project": project, "smoke": smoke, "results": str(results), "sections": sections,
        # with a W&B key (wandb login, or WANDB_API_KEY): upload the runs logged offline, then
        # publish the Report (it logs the figures and builds the run-set panels)
        "publish": [f"wandb sync {results}/*/*/*/wandb/offline-run-*",
                    f"python -m pcn_ep report {results} --out {out} --publish"
                    + (f" --wandb-project {project}" if project != "pcn-ep" else "")]}


def build_report(spec: dict, entity: str, figures_run: str | None = None):
    """The ``wandb_workspaces`` Report of a specification. ``figures_run``: the id of the W&B run
    holding the figures (without it the figures are left out). Building needs no login; saving
    (``.save()``) does."""
    import warnings

    with warnings.catch_warnings():  # wandb-workspaces 0.4 still uses Pydantic V1 validators
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr

    def panel(p: dict):
        if p["kind"] == "grid":
            return wr.ScatterPlot(title=p["title"], x=wr.Config(p["x"]), y=wr.Config(p["y"]),
                                  z=wr.SummaryMetric(p["value"]), log_x=True,
                                  gradient=[wr.GradientPoint(color="#2ca02c", offset=0),
                                            wr.GradientPoint(color="#d62728", offset=100)])
        return wr.LinePlot(title=p["title"], x=p["x"], y=[p["y"]])

    blocks = [wr.TableOfContents()]
    for section in spec["sections"]:
        blocks += [wr.H1(section["title"]), wr.MarkdownBlock(section["markdown"])]
        if section["runset"]:
            rs = section["runset"]
            blocks.append(wr.PanelGrid(
                runsets=[wr.Runset(entity=entity, project=rs["project"], name=rs["name"],
                                   filters=rs["filters"])],
                panels=[panel(p) for p in section["panels"]]))
        if section["figures"] and figures_run:
            blocks.append(wr.PanelGrid(
                runsets=[wr.Runset(entity=entity, project=spec["project"], name="figures",
                                   filters=f"Metric(\"ID\") == '{figures_run}'")],
                panels=[wr.MediaBrowser(title=section["title"],
                                        media_keys=[f["key"] for f in section["figures"]])]))
    return wr.Report(project=spec["project"], entity=entity, title=spec["title"],
                     description=spec["description"], blocks=blocks, width="fluid")


def publish(spec: dict, out: Path) -> str:
    """Log the figures to one W&B run, save the Report; return its URL."""
    import wandb

    run = wandb.init(project=spec["project"], job_type="report", dir=str(out.resolve()),
                     name=spec["title"][:120], settings=wandb.Settings(init_timeout=60))
    for section in spec["sections"]:
        for figure in section["figures"]:
            run.log({figure["key"]: wandb.Image(str(out / figure["file"]))})
    entity, run_id = run.entity, run.id
    run.finish()
    return build_report(spec, entity, run_id).save().url


def publish_or_describe(results: Path, out: Path, tables: list[str], smoke: bool,
                        project: str) -> tuple[str, int]:
    """Write the specification of ``tables`` (of kind ``smoke``); publish it where W&B can be
    reached. One line to print, and the exit code."""
    from ..training.loggers import wandb_offline

    spec = specification(results, out, tables, smoke, project)
    path = output_path(out, SPEC)   # not through a symlink planted in --out
    path.write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n")
    later = ("to publish it, with a W&B key (wandb login, or WANDB_API_KEY): "
             + " && ".join(spec["publish"]))
    if wandb_offline():
        return (f"report: no W&B key (or WANDB_MODE=offline): wrote the W&B Report's specification "
                f"to {path}; {later}", 0)
    if importlib.util.find_spec("wandb_workspaces") is None:
        return (f"pcn_ep: error: publishing a W&B Report needs wandb-workspaces: pip install "
                f"'pcn-ep[wandb-report]' (its specification is in {path})", 1)
    try:
        url = publish(spec, out)
    except Exception as err:  # no network, W&B refused: the specification stays for later
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        return (f"report: could not reach W&B ({reason}): wrote the W&B Report's specification "
                f"to {path}; {later}", 0)
    return f"published the W&B Report: {url} (specification: {path})", 0

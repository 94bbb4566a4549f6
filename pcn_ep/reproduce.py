"""``python -m pcn_ep reproduce TABLE [options]``: run one paper table's grid, then report it.

Each table is a list of cells; a cell is a paper config (``configs/*.yaml``) plus the overrides that
make it that cell. Every (cell, seed) is one ``python -m pcn_ep fit`` process (or ``energy`` for
Fig. 8) with its own folder ``OUT/TABLE/CELL/seedS/`` holding:

- ``run.json``: the table, the cell's labels, the seed, the exact command, status (``ok``,
  ``diverged`` or ``failed``) and wall time; ``metrics.csv`` (Lightning's CSV logger); ``config.yaml``;
- ``wandb/``: the W&B run (project ``--wandb-project``, group = the table, tags = the cell's labels),
  offline unless an API key is configured;
- ``checkpoints/last.ckpt``: a rerun resumes an unfinished run from it and skips finished ones.

A diverged run is a result (Fig. 5 marks them NaN); any other failure stops the sweep with the run's
error line. ``--smoke`` runs the same grid on the embedded digits with tiny networks and 2 epochs
(``configs/smoke.yaml``), so the whole pipeline is checked on a laptop CPU.

Scheduling: with G GPUs, VGG5 cells run G at a time, one GPU each; VGG10 cells use all G GPUs in one
DDP run (the paper trained each run on one A100: the global batch is then G × 256, see README). On a
CPU, ``--jobs`` processes share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SCHEMES = ("forward", "backward", "centered", "random")


@dataclass(frozen=True)
class Cell:
    """One configuration of a table: ``labels`` name it (W&B tags, report rows and columns)."""

    labels: dict
    config: str                          # a file name in configs/
    overrides: dict = field(default_factory=dict)
    command: str = "fit"

    @property
    def name(self) -> str:
        return "/".join(f"{k}={v}" for k, v in self.labels.items())


@dataclass(frozen=True)
class Table:
    name: str                            # the W&B group and the results folder
    title: str
    cells: Callable[[], list[Cell]]
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None            # None: the config's (the paper's) epochs
    ddp: bool = False                    # one run on all GPUs (VGG10) instead of one GPU per run


def _schemes() -> list[Cell]:
    """Fig. 1: {CE-nudge, MSE-nudge, clamp} × the four schemes, VGG5 on CIFAR-100 and ImageNet32."""
    methods = {"ce-nudge": "ce", "mse-nudge": "mse", "clamp": "clamp"}
    return [Cell({"dataset": d, "method": m, "scheme": s}, f"vgg5_{d}_{suffix}.yaml",
                 {"model.scheme": s})
            for d in ("cifar100", "imagenet32") for m, suffix in methods.items() for s in SCHEMES]


BETAS = (1e-4, 2e-4, 1e-3, 1e-2, 1e-1, 5e-1)
KS = (1, 2, 3, 4, 5, 10)


def _beta_k() -> list[Cell]:
    """Fig. 2: β × K on VGG5 CIFAR-100 (MSE nudge, centered; 20 epochs). The grid's values are not
    in the text [?]: ours brackets the paper's safe region K ≥ 4, 2e-4 ≤ β ≤ 0.1 on both sides."""
    return [Cell({"beta": b, "K": k}, "vgg5_cifar100_mse.yaml", {"model.beta": b, "model.K": k})
            for b in BETAS for k in KS]


def _top5() -> list[Cell]:
    """Table 2 (VGG10: centered, random, BP) and Sec. 5.5 (VGG10Skip: centered, BP) on ImageNet."""
    runs = {("vgg10", "centered-ep"): "vgg10.yaml", ("vgg10", "random-ep"): "vgg10_random.yaml",
            ("vgg10", "bp"): "vgg10_bp.yaml", ("vgg10skip", "centered-ep"): "vgg10skip.yaml",
            ("vgg10skip", "bp"): "vgg10skip_bp.yaml"}
    return [Cell({"model": m, "method": a}, c) for (m, a), c in runs.items()]


DATASETS = ("mnist", "cifar10", "cifar100", "imagenet32")


def _costs() -> list[Cell]:
    """Table 1: VGG5, {MSE, CE} × {EP (centered nudge), BP} on the four data sets."""
    return [Cell({"dataset": d, "cost": c, "method": a}, f"vgg5_{d}_{c}{'_bp' if a == 'bp' else ''}.yaml")
            for d in DATASETS for c in ("mse", "ce") for a in ("ep", "bp")]


def _pgd() -> list[Cell]:
    """Table 3 / Fig. 7: PGD vs mod-PGD (MSE nudge) with K = 5 and 10."""
    return [Cell({"dataset": d, "rule": r, "K": k}, f"vgg5_{d}_mse.yaml",
                 {"model.rule": r, "model.K": k})
            for d in ("cifar10", "cifar100", "imagenet32") for r in ("mod-pgd", "pgd") for k in (5, 10)]


def _traversal() -> list[Cell]:
    """Fig. 5: sync/async × K ∈ {5, 10, 20} × α ∈ {0.1, 0.5, 1}, VGG5 CIFAR-100 (MSE nudge [?]; the
    paper does not name the cost or the epochs: we use 20 epochs, as Fig. 2)."""
    return [Cell({"order": o, "K": k, "alpha": a}, "vgg5_cifar100_mse.yaml",
                 {"model.order": o, "model.K": k, "model.alpha": a})
            for o in ("sync", "async") for k in (5, 10, 20) for a in (0.1, 0.5, 1.0)]


def _energy() -> list[Cell]:
    """Fig. 8: F = E + βC against K for VGG10, mod-PGD and PGD at ±β, 8 validation images."""
    return [Cell({"model": "vgg10"}, "vgg10.yaml", command="energy")]


def _init_gain() -> list[Cell]:
    """Fig. 3: output-layer init gain 0.2 vs 1.0, VGG5 ImageNet32 MSE, EP and BP."""
    return [Cell({"output_gain": g, "method": a}, f"vgg5_imagenet32_mse{'_bp' if a == 'bp' else ''}.yaml",
                 {"model.network.init_args.output_gain": g})
            for g in (0.2, 1.0) for a in ("ep", "bp")]


BATCH_SIZES = (16, 64, 256)


def _batch_size() -> list[Cell]:
    """Fig. 4: batch sizes, VGG5 CIFAR-100 MSE, EP and BP (the sizes are not in the text [?]; the
    learning rate stays the config's)."""
    return [Cell({"batch_size": b, "method": a}, f"vgg5_cifar100_mse{'_bp' if a == 'bp' else ''}.yaml",
                 {"data.init_args.batch_size": b})
            for b in BATCH_SIZES for a in ("ep", "bp")]


TABLES = {t.name: t for t in [
    Table("table_schemes", "Fig. 1: perturbation method x finite-difference scheme (VGG5)", _schemes),
    Table("table_beta_K", "Fig. 2: test error vs beta and K (VGG5, CIFAR-100, 20 epochs)", _beta_k,
          epochs=20),
    Table("table_top5", "Table 2 and Sec. 5.5: VGG10 / VGG10Skip on ImageNet", _top5, ddp=True),
    Table("table_costs", "Table 1: cost function, EP vs BP (VGG5)", _costs, seeds=(0, 1, 2)),
    Table("table_pgd", "Table 3 / Fig. 7: PGD vs mod-PGD (VGG5, MSE nudge)", _pgd, seeds=(0, 1, 2)),
    Table("fig_traversal", "Fig. 5: traversal x K x alpha (VGG5, CIFAR-100)", _traversal, epochs=20),
    Table("fig_energy", "Fig. 8: total energy F vs nudge iteration K (VGG10)", _energy),
    Table("fig_init_gain", "Fig. 3: output-layer init gain (VGG5, ImageNet32, MSE)", _init_gain),
    Table("fig_batch_size", "Fig. 4: batch size (VGG5, CIFAR-100, MSE)", _batch_size),
]}


# -- one run ------------------------------------------------------------------------------------
def data_overrides(config: str, roots: dict[str, str]) -> dict:
    """Point a config at the user's data: ``--data-root cifar100=/x`` (ImageDataModule roots) or
    ``imagenet=/dir`` holding ``train.beton`` and ``val.beton``."""
    spec = yaml.safe_load((CONFIGS / config).read_text())["data"]["init_args"]
    if "dataset" in spec and spec["dataset"] in roots:
        return {"data.init_args.root": roots[spec["dataset"]]}
    if "train_path" in spec and "imagenet" in roots:
        folder = Path(roots["imagenet"])
        return {"data.init_args.train_path": str(folder / "train.beton"),
                "data.init_args.val_path": str(folder / "val.beton")}
    return {}


def run_overlay(table: Table, cell: Cell, seed: int, run_dir: Path, project: str,
                smoke: bool) -> dict:
    """The per-run config layered last: where it logs (CSV + W&B) and checkpoints."""
    run = str(run_dir)
    tags = [f"{k}={v}" for k, v in cell.labels.items()] + [f"seed={seed}"]
    return {"trainer": {
        "default_root_dir": run,
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": run, "name": "", "version": ""}},
            {"class_path": "pcn_ep.loggers.WandbLogger",
             "init_args": {"project": project, "group": table.name, "tags": tags,
                           "name": f"{cell.name}/seed={seed}", "save_dir": run,
                           "config": {"table": table.name, "cell": cell.labels, "seed": seed,
                                      "smoke": smoke}}}],
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": f"{run}/checkpoints", "monitor": "val/top1_error",
                           "mode": "min", "save_last": True, "enable_version_counter": False}},
            {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}],
    }}


def command(table: Table, cell: Cell, seed: int, run_dir: Path, args: argparse.Namespace,
            devices: int) -> list[str]:
    configs = [CONFIGS / cell.config] + ([CONFIGS / "smoke.yaml"] if args.smoke else [])
    if cell.command == "energy":
        cmd = [sys.executable, "-m", "pcn_ep", "energy", "--out", str(run_dir / "energy.json"),
               "--seed", str(seed)]
        cmd += [a for c in configs for a in ("--config", str(c))]
        if args.energy_ckpt:
            cmd += ["--ckpt", args.energy_ckpt]
        return cmd + ["--device", "cuda" if devices else "cpu"]
    overlay = run_dir / "run.yaml"
    overlay.write_text(yaml.safe_dump(
        run_overlay(table, cell, seed, run_dir, args.wandb_project, args.smoke)))
    overrides = {} if args.smoke else data_overrides(cell.config, args.data_root)
    if table.epochs and not args.smoke:
        overrides.update({"trainer.max_epochs": table.epochs, "model.t_max": table.epochs})
    overrides.update(cell.overrides)
    overrides.update({"seed_everything": seed, "model.seed": seed, "data.init_args.seed": seed})
    if devices:
        overrides.update({"trainer.accelerator": "gpu", "trainer.devices": devices})
        if devices > 1:
            overrides["trainer.strategy"] = "ddp"
    elif not args.smoke:
        overrides.update({"trainer.accelerator": "cpu", "trainer.devices": 1})
    overrides.update(args.set)
    cmd = [sys.executable, "-m", "pcn_ep", "fit"]
    cmd += [a for c in [*configs, overlay] for a in ("--config", str(c))]
    cmd += [f"--{k}={v}" for k, v in overrides.items()]
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        cmd.append("--ckpt_path=last")
    return cmd


def run_folder(out: Path, table: Table, cell: Cell, seed: int) -> Path:
    return out / table.name / cell.name.replace("/", "__") / f"seed{seed}"


def run_one(table: Table, cell: Cell, seed: int, args: argparse.Namespace,
            gpus: list[int]) -> dict:
    run_dir = run_folder(args.out, table, cell, seed)
    record_path = run_dir / "run.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["status"] in ("ok", "diverged"):
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(table, cell, seed, run_dir, args, len(gpus))
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    lines = (run_dir / "log.txt").read_text(errors="replace").replace("\r", "\n").splitlines()
    error = next((l for l in reversed(lines) if "error:" in l), lines[-1] if lines else "")
    status = "ok" if rc == 0 else ("diverged" if "diverged" in error else "failed")
    record = {"table": table.name, "cell": cell.labels, "seed": seed, "config": cell.config,
              "smoke": args.smoke, "status": status, "returncode": rc,
              "error": None if rc == 0 else error.strip(), "wall_s": round(time.time() - start, 1),
              "command": cmd}
    record_path.write_text(json.dumps(record, indent=1))
    return record


# -- the sweep ----------------------------------------------------------------------------------
def gpu_slots(gpus: int, ddp: bool) -> list[list[int]]:
    """The GPU sets that runs use concurrently: one GPU per run, or all of them for a DDP run."""
    per_run = max(1, gpus) if ddp else 1
    return [list(range(i * per_run, (i + 1) * per_run)) for i in range(gpus // per_run)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcn_ep reproduce",
                                description="run one paper table's grid and write its report")
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default results/ or, with --smoke, results/smoke/)")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH",
                   help="mnist|cifar10|cifar100|imagenet32=ROOT, imagenet=DIR with train.beton "
                        "and val.beton (repeatable; default: the configs' data/NAME)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs on this node (default: all visible)")
    p.add_argument("--jobs", type=int, default=None,
                   help="concurrent runs on a CPU (default 1, or 2 with --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the table's")
    p.add_argument("--smoke", action="store_true",
                   help="the same grid on the embedded digits, tiny nets, 2 epochs (CPU)")
    p.add_argument("--wandb-project", default="pcn-ep")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every run, e.g. trainer.precision=32")
    p.add_argument("--energy-ckpt", default=None, help="fig_energy: a trained VGG10 checkpoint "
                                                       "(default: the network at initialization)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's command (e.g. to submit them to a job scheduler), run none")
    return p


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    table = TABLES[args.table]
    if not CONFIGS.is_dir():
        print(f"reproduce: error: {CONFIGS} not found: run from a checkout of the repository "
              "installed with pip install -e .", file=sys.stderr)
        return 2
    try:
        args.data_root, args.set = _pairs(args.data_root, "--data-root"), _pairs(args.set, "--set")
    except ValueError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    for name, root in args.data_root.items():
        if not Path(root).exists():
            print(f"reproduce: error: --data-root {name}: {root} does not exist", file=sys.stderr)
            return 2
        args.data_root[name] = str(Path(root).resolve())  # runs start in the repository root
    if args.energy_ckpt:
        args.energy_ckpt = str(Path(args.energy_ckpt).resolve())
    args.out = (args.out or ROOT / ("results/smoke" if args.smoke else "results")).resolve()
    if args.gpus is None:
        import torch
        args.gpus = 0 if args.smoke else torch.cuda.device_count()
    slots = gpu_slots(args.gpus, table.ddp)
    jobs = len(slots) or args.jobs or (2 if args.smoke else 1)
    # CPU runs share the cores; a GPU run needs few threads (its data loaders have their workers).
    args.threads = max(1, (os.cpu_count() or 1) // jobs) if not slots else 4
    runs = [(cell, seed) for cell in table.cells() for seed in (args.seeds or table.seeds)]
    if args.dry_run:
        for cell, seed in runs:
            run_dir = run_folder(args.out, table, cell, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            print(shlex.join(command(table, cell, seed, run_dir, args, len(slots[0]) if slots else 0)))
        return 0
    print(f"{table.title}: {len(runs)} runs, {jobs} at a time -> {args.out / table.name}")
    free, lock, failures = list(slots), threading.Lock(), []

    def execute(item):
        if failures:  # a failure that is not divergence would repeat in every run: stop
            return
        cell, seed = item
        with lock:
            gpus = free.pop() if slots else []
        try:
            record = run_one(table, cell, seed, args, gpus)
        finally:
            if slots:
                with lock:
                    free.append(gpus)
        print(f"  {record['status']:<8} {record['wall_s']:7.1f} s  {cell.name} seed={seed}"
              + (f"  ({record['error']})" if record["error"] else ""), flush=True)
        if record["status"] == "failed":
            failures.append(record)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(execute, runs))
    if failures:
        failed = failures[0]
        print(f"reproduce: error: run {failed['cell']} seed {failed['seed']} failed: "
              f"{failed['error']} (log: {args.out / table.name})", file=sys.stderr)
        return 1
    if not args.no_report:
        from .report import write_report

        for path in write_report(args.out, args.out / "report", tables=[table.name]):
            print(f"wrote {path}")
    return 0

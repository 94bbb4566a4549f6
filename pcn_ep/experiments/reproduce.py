"""``python -m pcn_ep reproduce TABLE [options]``: run one paper table's grid, then report it.

Each table is a list of cells; a cell is a paper config (``configs/*.yaml``) plus the overrides that
make it that cell. Every (cell, seed) is one ``python -m pcn_ep fit`` process (or ``energy`` for
Fig. 8) with its own folder ``OUT/TABLE/CELL/seedS/`` holding:

- ``run.json``: the table, the cell's labels, the seed, the exact command, status (``ok``,
  ``diverged``, ``stopped``: by a signal, exit 129/130/143, or ``failed``) and wall time;
  ``metrics.csv`` (Lightning's CSV logger); ``config.yaml``;
- ``wandb/``: the W&B run (project ``--wandb-project``, group = the table, tags = the cell's labels),
  offline unless an API key is configured;
- ``checkpoints/last.ckpt``: a rerun resumes an unfinished run from it and skips finished ones.

A diverged run is a result (Fig. 5 marks them NaN); any other failure stops the sweep with the run's
error line; data the table needs and cannot find stops it before the first run. ``--smoke`` runs
the same grid on the embedded digits with tiny networks and 2 epochs (``configs/smoke.yaml``), so
the whole pipeline is checked on a laptop CPU. Each results folder holds one kind (smoke or real,
marked in ``.pcn_ep-results.json``): the report of a folder never mixes them.

Scheduling: with G GPUs, VGG5 cells run G at a time, one GPU each; VGG10 cells use all G GPUs in one
DDP run (the paper trained each run on one A100: the global batch is then G × 256, see README). On a
CPU, ``--jobs`` processes share the cores. ``--launcher slurm`` submits each run as a SLURM job
through submitit instead (``SlurmRun``): a job stopped by its time limit or a preemption is requeued
and resumes from its run's ``last.ckpt``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from ..argtypes import nonneg_int, positive_int, seed as seed_number
from ..commandline import CommandParser
from ..files import write_text_atomically
from .results import MARKER, root_kind
from ..shipped import CONFIGS
from .tables import TABLES, Cell, Table

SLURM_CLUSTER = "slurm"           # submitit's executor for --launcher slurm ("local" in the tests)
SIGNAL_DELAY_S = 120              # SLURM signals a job this long before its time limit
REQUEUES = 100                    # time-outs a run may be requeued after (preemptions do not count)
# exit codes of a fit process stopped by a signal after saving last.ckpt (128 + the signal): the
# run is "stopped", never "ok", and the next attempt resumes from last.ckpt
STOPPED = {129: "SIGHUP", 130: "SIGINT", 143: "SIGTERM or SIGUSR1"}
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


def missing_data(cells: list[Cell], roots: dict[str, str], extra: dict) -> dict[str, str]:
    """The data sets the cells need that are not where their runs would look: {NAME: path}.
    A run starts where reproduce was started, so a config's relative root is relative to it."""
    missing = {}
    for cell in cells:
        spec = dict(yaml.safe_load((CONFIGS / cell.config).read_text())["data"]["init_args"])
        spec.update({k.removeprefix("data.init_args."): v
                     for k, v in {**data_overrides(cell.config, roots), **cell.overrides,
                                  **extra}.items() if k.startswith("data.init_args.")})
        if "dataset" in spec and "root" in spec:
            if not Path(str(spec["root"])).is_dir():
                missing.setdefault(spec["dataset"], str(spec["root"]))
        elif "train_path" in spec:
            for key in ("train_path", "val_path"):
                if not Path(str(spec[key])).is_file():
                    missing.setdefault("imagenet", str(spec[key]))
    return missing


def data_error(table: str, missing: dict[str, str]) -> str:
    flags = " ".join(f"--data-root {name}=" + ("DIR" if name == "imagenet" else "PATH")
                     for name in missing)
    found = ", ".join(f"{name} ({path} not found)" for name, path in missing.items())
    return (f"pcn_ep: error: {table} needs data it cannot find: {found}. Pass {flags}"
            + (" (imagenet: DIR holds train.beton and val.beton)" if "imagenet" in missing else "")
            + ", or --smoke for the embedded digits")


def run_overlay(table: Table, cell: Cell, seed: int, run_dir: Path, project: str,
                smoke: bool) -> dict:
    """The per-run config layered last: where it logs (CSV + W&B) and checkpoints. The config's
    own callbacks stay (its checkpoint metric, the gradient-fidelity monitor): their folders
    follow ``trainer.default_root_dir``."""
    run = str(run_dir)
    tags = [f"{k}={v}" for k, v in cell.labels.items()] + [f"seed={seed}"]
    return {"trainer": {
        "default_root_dir": run,
        "logger": [
            # pcn_ep's CSVLogger appends across resumes (Lightning's deletes the earlier rows)
            {"class_path": "pcn_ep.training.loggers.CSVLogger",
             "init_args": {"save_dir": run, "name": ""}},
            {"class_path": "pcn_ep.training.loggers.WandbLogger",
             "init_args": {"project": project, "group": table.name, "tags": tags,
                           "name": f"{cell.name}/seed={seed}", "save_dir": run,
                           "config": {"table": table.name, "cell": cell.labels, "seed": seed,
                                      "smoke": smoke}}}],
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
    if devices:  # -1: every GPU of the node the command runs on (--dry-run for a DDP table)
        overrides.update({"trainer.accelerator": "gpu", "trainer.devices": devices})
        if devices > 1 or devices == -1:
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
            gpus: list[int], devices: int | None = None, job: "SlurmRun | None" = None) -> dict:
    """Run one (cell, seed) in its folder unless it already ended ok or diverged; return its record.
    ``devices`` defaults to ``len(gpus)``; ``job``: the SLURM job running it (its rank, and the
    process it stops when SLURM signals the job)."""
    run_dir = run_folder(args.out, table, cell, seed)
    record_path = run_dir / "run.json"
    if finished(run_dir):
        return stored_record(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(table, cell, seed, run_dir, args, len(gpus) if devices is None else devices)
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    rank = job.rank() if job else 0
    start = time.time()
    # appended: a requeued run keeps the log of its earlier attempts
    with open(run_dir / ("log.txt" if not rank else f"log.rank{rank}.txt"), "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=job.child_setup if job else None)
        if job:
            job.child = proc
        rc = proc.wait()
    with open(log.name, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").replace("\r", "\n").splitlines()
    error = next((l for l in reversed(lines) if "error:" in l), lines[-1] if lines else "")
    if rc in STOPPED:
        error = next((l for l in reversed(lines) if l.startswith("pcn_ep: stopped")),
                     f"stopped by {STOPPED[rc]} (exit {rc})")
    elif rc < 0:  # killed by a signal it did not handle: nothing saved since the last epoch
        error = f"killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else error
    # The return code alone decides: the CLI exits non-zero whenever a run did not end (a signal
    # during fit, its test or setup), so exit 0 is a run that trained and tested.
    status = ("ok" if rc == 0 else "stopped" if rc in STOPPED
              else "diverged" if "diverged" in error else "failed")
    record = {"table": table.name, "cell": cell.labels, "seed": seed, "config": cell.config,
              "smoke": args.smoke, "status": status, "returncode": rc,
              "error": None if rc == 0 else error.strip(), "wall_s": round(time.time() - start, 1),
              "command": cmd}
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job"] = os.environ["SLURM_JOB_ID"]
    if not rank:  # one record per run: DDP ranks > 0 only log
        write_text_atomically(record_path, json.dumps(record, indent=1))
    return record


# -- SLURM through submitit -------------------------------------------------------------------
def preempt_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before a time limit or preemption (USR2 by default)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")]


class SlurmRun:
    """One run as a submitit job, following submitit's checkpointing protocol: ``__call__`` runs
    it; ``checkpoint`` is what submitit calls when SLURM signals the job (its time limit is near, or
    it is preempted). It stops the fit process as the CLI stops for SIGTERM (``last.ckpt`` after the
    current step, exit 143) and hands submitit this same object to requeue: the requeued job builds
    its command again, and ``command`` resumes a run folder holding ``last.ckpt``."""

    def __init__(self, table: Table, cell: Cell, seed: int, args: argparse.Namespace,
                 devices: int) -> None:
        self.table, self.cell, self.seed, self.args, self.devices = table, cell, seed, args, devices
        self.child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "child": None}  # a process does not travel in the pickle

    def __call__(self) -> dict:
        return run_one(self.table, self.cell, self.seed, self.args, [], self.devices, job=self)

    @staticmethod
    def rank() -> int:
        """The task's rank: a DDP run is one SLURM task per GPU, and Lightning reads the same."""
        import submitit

        return submitit.JobEnvironment().global_rank

    @staticmethod
    def child_setup() -> None:
        """In the fit process: SLURM signals every process of the job, but only this wrapper
        handles submitit's signal (the fit process would die of it before saving)."""
        signal.signal(preempt_signal(), signal.SIG_IGN)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        child, self.child = self.child, None
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            # os.waitpid, not child.wait(): the interrupted child.wait() below us holds its lock
            deadline = time.time() + SIGNAL_DELAY_S - 20
            while time.time() < deadline:
                try:
                    if os.waitpid(child.pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:  # already reaped
                    break
                time.sleep(0.2)
        return DelayedSubmission(self)


def slurm_minutes(text: str) -> int:
    """SLURM's time limit in minutes, from MINUTES, HH:MM:SS or D-HH:MM:SS."""
    match = re.fullmatch(r"(\d+)|(?:(\d+)-)?(\d+):(\d\d):(\d\d)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expects MINUTES, HH:MM:SS or D-HH:MM:SS, got {text!r}")
    if match[1]:
        if not int(match[1]):
            raise argparse.ArgumentTypeError(f"must be at least 1 minute, got {text!r}")
        return int(match[1])
    days, hours, mins, secs = (int(g or 0) for g in match.groups()[1:])
    return max(1, days * 1440 + hours * 60 + mins + math.ceil(secs / 60))


def slurm_gpus(table: Table, args: argparse.Namespace) -> int:
    """GPUs per job: none for --smoke (CPU jobs), else --gpus-per-run, default 1 (8 for a DDP table)."""
    if args.smoke:
        return 0
    return args.gpus_per_run if args.gpus_per_run is not None else (8 if table.ddp else 1)


def slurm_parameters(table: Table, args: argparse.Namespace) -> dict:
    """submitit's parameters of each job: one node, one task per GPU (Lightning's SLURM layout)."""
    gpus = slurm_gpus(table, args)
    params = {"nodes": 1, "tasks_per_node": max(1, gpus), "gpus_per_node": gpus,
              "cpus_per_task": args.cpus_per_task, "timeout_min": args.time,
              "slurm_signal_delay_s": SIGNAL_DELAY_S,
              "slurm_additional_parameters": {"requeue": True}}
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    return params


def slurm_header(table: Table, args: argparse.Namespace, jobs: int) -> str:
    """What each job asks SLURM for, as sbatch flags (printed by --dry-run)."""
    p, gpus = slurm_parameters(table, args), slurm_gpus(table, args)
    flags = [f"--partition={args.partition}"] * bool(args.partition)
    flags += [f"--account={args.account}"] * bool(args.account)
    flags += [f"--nodes=1 --ntasks-per-node={p['tasks_per_node']}"]
    flags += [f"--gpus-per-node={gpus}"] * bool(gpus)
    flags += [f"--cpus-per-task={args.cpus_per_task} --time={args.time}",
              f"--signal=USR2@{SIGNAL_DELAY_S} --requeue"]
    return (f"# would submit {jobs} SLURM jobs through submitit, each: {' '.join(flags)}; "
            "requeued at its time limit or on preemption, resuming from its last.ckpt; each runs:")


def submit(table: Table, runs: list, args: argparse.Namespace) -> int:
    """Submit one SLURM job per unfinished run; with --wait, wait for them and report."""
    try:
        import submitit

        executor = submitit.AutoExecutor(folder=args.out / table.name / ".submitit",
                                         cluster=SLURM_CLUSTER, slurm_max_num_timeout=REQUEUES)
        executor.update_parameters(**slurm_parameters(table, args))
    except ImportError:
        print("pcn_ep: error: --launcher slurm needs submitit: pip install submitit",
              file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as err:  # no srun on this host, a parameter SLURM refuses
        print(f"pcn_ep: error: cannot submit to SLURM: {' '.join(str(err).split())}",
              file=sys.stderr)
        return 2
    # as here: a CPU job's threads take its CPUs, a GPU run's few (its data loaders have workers)
    args.threads = min(4, args.cpus_per_task) if slurm_gpus(table, args) else args.cpus_per_task
    jobs = []
    for cell, seed in runs:
        executor.update_parameters(name=f"{table.name}/{cell.name}/seed{seed}")
        job = executor.submit(SlurmRun(table, cell, seed, args, slurm_gpus(table, args)))
        jobs.append((cell, seed, job))
    print(f"{table.title}: submitted {len(jobs)} SLURM jobs ({jobs[0][2].job_id}"
          f"{f' … {jobs[-1][2].job_id}' if len(jobs) > 1 else ''}) -> {args.out / table.name}; "
          f"job logs in {args.out / table.name / '.submitit'}", flush=True)
    if not args.wait:
        print(f"when they have ended: python -m pcn_ep report {args.out} --out {args.out / 'report'}"
              " (rerun this command to resubmit runs that did not finish)")
        return 0
    failures = []
    for cell, seed, job in jobs:
        try:
            record = job.result()
        except Exception as err:  # the job itself failed (submitit's error holds the traceback)
            record = {"status": "failed", "wall_s": 0.0,
                      "error": f"SLURM job {job.job_id}: {str(err).strip().splitlines()[-1]}"}
        print(f"  {record['status']:<8} {record['wall_s']:7.1f} s  {cell.name} seed={seed}"
              + (f"  ({record['error']})" if record["error"] else ""), flush=True)
        if record["status"] not in ("ok", "diverged"):
            failures.append((cell, seed, record))
    if failures:
        cell, seed, record = failures[0]
        print(f"pcn_ep: error: {len(failures)} run(s) did not end ok, first {cell.labels} seed "
              f"{seed}: {record['error']} (log: {run_folder(args.out, table, cell, seed)})",
              file=sys.stderr)
        return 1
    return write_table_report(table, args)


# -- the sweep ----------------------------------------------------------------------------------
def gpu_slots(gpus: int, ddp: bool) -> list[list[int]]:
    """The GPU sets that runs use concurrently: one GPU per run, or all of them for a DDP run."""
    per_run = max(1, gpus) if ddp else 1
    return [list(range(i * per_run, (i + 1) * per_run)) for i in range(gpus // per_run)]


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pcn_ep reproduce",
                                description="run one paper table's grid and write its report")
    p.add_argument("table", choices=sorted(TABLES),
                   help="the paper's table or figure to reproduce (each is a grid of runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default results/ or, with --smoke, results/smoke/)")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH",
                   help="mnist|cifar10|cifar100|imagenet32=ROOT, imagenet=DIR with train.beton "
                        "and val.beton (repeatable; default: the configs' data/NAME)")
    p.add_argument("--gpus", type=nonneg_int, default=None,
                   help="GPUs on this node (default: all visible; with --dry-run, GPU commands even "
                        "where none is visible: one GPU per VGG5 run, every GPU of the node for a "
                        "DDP run; --gpus 0: CPU commands)")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="concurrent runs on a CPU (default 1, or 2 with --smoke)")
    p.add_argument("--seeds", type=seed_number, nargs="+", default=None, help="default: the table's")
    p.add_argument("--smoke", action="store_true",
                   help="the same grid on the embedded digits, tiny nets, 2 epochs (CPU)")
    p.add_argument("--wandb-project", default="pcn-ep",
                   help="the Weights & Biases project the runs log to (offline without an API key)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every run, e.g. trainer.precision=32 (repeatable)")
    p.add_argument("--energy-ckpt", default=None, help="fig_energy: a trained VGG10 checkpoint "
                                                       "(default: the network at initialization)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's command (e.g. to submit them to a job scheduler), run "
                        "none; GPU commands unless --gpus 0; with --launcher slurm, also what "
                        "each job asks SLURM for")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local (default): run here; slurm: submit each run as a SLURM job "
                        "through submitit, requeued at its time limit or on preemption, resuming "
                        "from its last.ckpt (--gpus and --jobs do not apply)")
    slurm = p.add_argument_group("--launcher slurm")
    slurm.add_argument("--partition", default=None,
                       help="the SLURM partition to submit to (default: the cluster's)")
    slurm.add_argument("--account", default=None,
                       help="the SLURM account to charge (default: yours)")
    slurm.add_argument("--gpus-per-run", type=nonneg_int, default=None,
                       help="default 1, or 8 for a table whose runs use DDP (table_top5); "
                            "--smoke submits CPU jobs")
    slurm.add_argument("--time", type=slurm_minutes, default="24:00:00",
                       help="each job's time limit, MINUTES or [D-]HH:MM:SS (default 24:00:00): "
                            "a run that needs longer is requeued and goes on from last.ckpt")
    slurm.add_argument("--cpus-per-task", type=positive_int, default=8,
                       help="CPUs per task, i.e. per GPU (default 8): the data loader's workers")
    slurm.add_argument("--wait", action="store_true",
                       help="wait for the jobs to end, then write the report")
    return p


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def claim_root(out: Path, smoke: bool) -> str | None:
    """Mark ``out`` as a smoke or a real results root; an error line if it holds the other kind
    (the report reads one root, so smoke and real runs never mix)."""
    kind = "smoke" if smoke else "real"
    marker = out / MARKER
    marked = root_kind(out, warn=lambda line: print(f"pcn_ep: warning: {line}", file=sys.stderr))
    kinds = {marked} if marked is not None else {
        bool(record.get("smoke")) for record in map(stored_record, out.glob("*/*/*/")) if record}
    other = ("smoke" if not smoke else "real") if (not smoke) in kinds else None
    if other:
        return (f"pcn_ep: error: {out} holds {other} runs: {kind} runs need their own results "
                f"folder (--out; the default is results/ for real runs, results/smoke/ for smoke)")
    if out.exists() and not out.is_dir():
        return f"pcn_ep: error: reproduce: --out {out} is a file, not a results folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"smoke": smoke}) + "\n")
    except OSError as err:  # a file in the way, no permission
        return f"pcn_ep: error: reproduce: --out {out}: cannot write there ({err.strerror})"
    return None


def print_commands(lines) -> int:
    """Print one command a line; a reader that stops early (``| head -1``) ends it quietly."""
    try:
        for line in lines:
            print(line, flush=True)
    except BrokenPipeError:
        try:  # no second BrokenPipeError when Python flushes stdout at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        sys.stdout = open(os.devnull, "w")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.seeds and len(set(args.seeds)) < len(args.seeds):  # two runs would share one folder
        p.error(f"argument --seeds: a seed is given twice: {args.seeds}")
    table = TABLES[args.table]
    try:
        args.data_root, args.set = _pairs(args.data_root, "--data-root"), _pairs(args.set, "--set")
    except ValueError as err:
        print(f"pcn_ep: error: {err}", file=sys.stderr)
        return 2
    for name, root in args.data_root.items():
        if not Path(root).exists():
            print(f"pcn_ep: error: --data-root {name}: {root} does not exist", file=sys.stderr)
            return 2
        args.data_root[name] = str(Path(root).resolve())  # absolute in the logged commands
    if args.energy_ckpt:
        from ..tools.energy import read_checkpoint  # as energy reads it: data only, one line

        args.energy_ckpt = str(Path(args.energy_ckpt).resolve())
        try:
            read_checkpoint(args.energy_ckpt)
        except (ValueError, FileNotFoundError) as err:
            print(f"pcn_ep: error: reproduce: --energy-ckpt: {err}", file=sys.stderr)
            return 2
    args.out = (args.out or Path("results/smoke" if args.smoke else "results")).resolve()
    runs = [(cell, seed) for cell in table.cells() for seed in (args.seeds or table.seeds)]
    if not args.smoke and not args.dry_run:  # before the first run, not 57 s into it
        missing = missing_data([cell for cell, _ in runs], args.data_root, args.set)
        if missing:
            print(data_error(table.name, missing), file=sys.stderr)
            return 2
    if args.gpus is None and args.launcher == "local":
        import torch

        args.gpus = 0 if args.smoke else torch.cuda.device_count()
        if args.dry_run and not args.smoke and not args.gpus:
            args.gpus = -1  # commands for GPU nodes: a dry run is for a scheduler, not this host
    error = claim_root(args.out, args.smoke)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.launcher == "slurm":
        return launch_slurm(table, runs, args)
    if args.dry_run:
        devices = 0 if not args.gpus else (args.gpus if table.ddp else 1)
        return print_commands(command_lines(table, runs, args, devices))
    slots = gpu_slots(args.gpus, table.ddp)
    jobs = len(slots) or args.jobs or (2 if args.smoke else 1)
    # CPU runs share the cores; a GPU run needs few threads (its data loaders have their workers).
    args.threads = max(1, (os.cpu_count() or 1) // jobs) if not slots else 4
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
        if record["status"] not in ("ok", "diverged"):  # failed, or stopped by a signal
            failures.append(record)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(execute, runs))
    if failures:
        failed = failures[0]
        print(f"pcn_ep: error: run {failed['cell']} seed {failed['seed']} {failed['status']}: "
              f"{failed['error']} (log: {args.out / table.name}"
              + ("; rerun the command to resume it)" if failed["status"] == "stopped" else ")"),
              file=sys.stderr)
        return 1
    return write_table_report(table, args)


def command_lines(table: Table, runs: list, args: argparse.Namespace, devices: int):
    """--dry-run: each run's command, one a line."""
    for cell, seed in runs:
        run_dir = run_folder(args.out, table, cell, seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        yield shlex.join(command(table, cell, seed, run_dir, args, devices))


def launch_slurm(table: Table, runs: list, args: argparse.Namespace) -> int:
    """--launcher slurm: the runs that have not ended, printed (--dry-run) or submitted."""
    runs = [(c, s) for c, s in runs if not finished(run_folder(args.out, table, c, s))]
    if args.dry_run:
        return print_commands([slurm_header(table, args, len(runs)),
                               *command_lines(table, runs, args, slurm_gpus(table, args))])
    if not runs:
        print(f"{table.title}: every run has ended (ok or diverged) under {args.out / table.name}")
        return write_table_report(table, args)
    return submit(table, runs, args)


def stored_record(run_dir: Path) -> dict | None:
    """The ``run.json`` of a run folder as ``run_one`` wrote it; ``None`` when there is none or
    it is not one (a folder, a FIFO, a hand edit): that run is then simply run again."""
    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("status"), str) else None


def finished(run_dir: Path) -> bool:
    """The run ended ok or diverged: a rerun (or a resubmission) skips it."""
    record = stored_record(run_dir)
    return record is not None and record["status"] in ("ok", "diverged")


def write_table_report(table: Table, args: argparse.Namespace) -> int:
    if not args.no_report:
        from .report import write_report

        for path in write_report(args.out, args.out / "report", tables=[table.name]):
            print(f"wrote {path}")
    return 0

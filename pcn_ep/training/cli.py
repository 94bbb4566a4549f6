"""``python -m pcn_ep fit|validate|test [--config FILE] [overrides]``: LightningCLI over the module.

Without ``--config`` the embedded default (``pcn_ep/configs/quickstart.yaml``, shipped inside the
package) is used, so a fresh install trains a real PCN on scikit-learn's digits with no download.
Configuration errors (an unknown key, an impossible value) end with one error line and exit 1 or 2.

Configs are parsed in jsonargparse's ``omegaconf+`` mode: ``${seed_everything}`` and
``${trainer.default_root_dir}`` in a config resolve after every file and override is applied, so
one ``--seed_everything`` moves the data order, the sign generator and the run folder
(``runs/CONFIG/seedS``) together unless they are set explicitly.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import jsonargparse
import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..core import DivergenceError
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import (SIGNALS, STOP, CheckpointError, CheckpointWriteError, LogProgress, ModelSummary, Preempted,
                        RunFolderBusy, StopNow, checkpoint_folder, exit_code, last_checkpoint_path, on_disk, load_checkpoint,
                        model_checkpoints, on_signal)
from .loggers import WandbLogger as PCNWandbLogger
from .loggers import bind_loggers
from .module import PCNEPModule
from ..commandline import import_object
from ..shipped import CONFIGS, find_config, shipped_configs

PROG = "python -m pcn_ep"
SUBCOMMANDS = ("fit", "validate", "test")
DEFAULT_CONFIG = CONFIGS / "quickstart.yaml"
HELP = ("-h", "--help")
# --help: what each command does, and the headings of its sections (Lightning's and jsonargparse's
# would be the first lines of their docstrings)
DESCRIPTIONS = {
    "fit": "Train a PCN with equilibrium propagation (EP) or backprop, as the config says; without "
           "--config, the embedded quickstart (a small VGG5 on scikit-learn's digits). The default "
           "shown for each flag is the config's value.",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation split.",
    "test": "Evaluate a checkpoint (--ckpt_path) on the test split.",
}
GROUP_TITLES = {
    "trainer": "trainer (Lightning's Trainer: devices, precision, epochs, loggers, callbacks)",
    "model": "model (the PCN and how it learns: EP or backprop, the nudged phase, SGD)",
    "data": "data (the data set: a data module and its settings; --data.help CLASS lists them)",
    "fit": "checkpoint (a run to resume)",
    "validate": "checkpoint (the weights to evaluate)",
    "test": "checkpoint (the weights to evaluate)",
}
CKPT_PATH_HELP = {
    "fit": "resume a run: a checkpoint file, or ``last`` (the run folder's checkpoints/last.ckpt; "
           "with none yet, training starts from the beginning). null: train from the network "
           "the config initializes.",
    "evaluate": "the weights to evaluate: a checkpoint file, ``last`` (the run folder's "
                "checkpoints/last.ckpt) or ``best`` (the best checkpoint that last.ckpt records). "
                "null: the network as the config initializes it, untrained.",
}
SEED_HELP = ("the seed of everything random (initial weights, data order and augmentation, the "
             "random scheme's signs); the configs also name the run folder after it "
             "(runs/CONFIG/seedS). true: a random seed.")


class PCNArgumentParser(LightningArgumentParser):
    """Lightning's parser, named ``python -m pcn_ep COMMAND`` from the start: jsonargparse builds
    the parser of ``--model.network.help CLASS`` as ``type(parser)(...)``, whose usage line would
    otherwise name ``__main__.py``."""

    command = ""  # the subcommand being run (PCNCLI sets it)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("prog", f"{PROG} {self.command}".rstrip())
        super().__init__(*args, **kwargs)


class PCNCLI(LightningCLI):
    def __init__(self, args: list[str], run: bool = True) -> None:
        jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        parser_kwargs = {"allow_abbrev": False, "exit_on_error": False, "parser_mode": "omegaconf+"}
        parser_kwargs.update({name: {"description": text} for name, text in DESCRIPTIONS.items()})
        PCNArgumentParser.command = args[0] if args and args[0] in SUBCOMMANDS else ""
        self.help_asked = bool(run and args and args[0] in SUBCOMMANDS and any(a in HELP for a in args))
        if self.help_asked:
            # --help then shows the values of the config files given, not the classes' defaults
            parser_kwargs[args[0]]["default_config_files"] = config_paths(args)
        try:
            super().__init__(
                PCNEPModule,
                L.LightningDataModule,
                parser_class=PCNArgumentParser,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={"plugins": [{"class_path": "pcn_ep.training.callbacks.AtomicCheckpointIO"}],
                                  "callbacks": [ModelSummary()]},
                parser_kwargs=parser_kwargs,
                auto_configure_optimizers=False,  # the module's SGD + cosine are its own settings
                args=args,
                run=run,
            )
        except BaseException as err:
            if run:
                self.close_wandb(run_status(err))
                if getattr(self, "trainer", None) is not None:
                    err.on_disk = on_disk(self.trainer)  # for a stop message
            raise
        if run:
            self.close_wandb("ok")

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        main_kwargs.setdefault("prog", PROG)
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        for name, parser in getattr(self, "_subcommand_parsers", {}).items():
            parser.prog = f"{PROG} {name}"  # jsonargparse would say "PROG [options] fit"
            if name in SUBCOMMANDS:
                describe(parser, name, with_config_values=self.help_asked)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="evaluate the final weights on the test split after fit")
        parser.add_argument("--network_from_data", type=bool, default=False,
                            help="size the network from the data: num_classes, in_channels (or "
                                 "in_features) and input_size follow the data module's "
                                 "num_classes and example_shape(), whatever the config says")

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI would overwrite the config's model settings with those stored in a
        ``--ckpt_path`` file (but not with ``last``): here the config always decides, and a resume
        with other settings prints one warning (``PCNEPModule._check_resume``)."""

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's trainer, with ``LogProgress`` as its progress display when stdout is not a
        terminal (a bar redrawn with carriage returns would fill a job's log), unless the config
        turns the display off or picks its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        chosen = any(isinstance(c, ProgressBar) for c in (callbacks if isinstance(callbacks, list) else [callbacks]))
        if config.get("enable_progress_bar") is not False and not chosen and not sys.stdout.isatty():
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], LogProgress()]
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("network_from_data"):
            network_from_data(config)

    def before_fit(self) -> None:
        for name in ("max_epochs", "max_steps", "limit_train_batches"):
            if getattr(self.trainer, name) == 0:
                raise ValueError(f"trainer.{name} is 0: nothing would be trained (use `test` to "
                                 "evaluate a checkpoint)")
        check_run_folders(self.trainer)
        name_checkpoints(self.trainer)
        self.resolve_checkpoint(resume=True)
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_check=True))[self.subcommand]
        for logger in self.trainer.loggers:
            if isinstance(logger, PCNWandbLogger):
                logger.run_config = resolved  # logged with the hyperparameters at fit start
        bind_loggers(self.trainer, "fit")  # one history per run folder (loggers.py's rules)

    def before_validate(self) -> None:
        limit = f"limit_{'test' if self.subcommand == 'test' else 'val'}_batches"
        if getattr(self.trainer, limit) == 0:
            raise ValueError(f"trainer.{limit} is 0: nothing would be evaluated")
        self.resolve_checkpoint(resume=False)
        bind_loggers(self.trainer, self.subcommand)  # logs into the run folder's history

    before_test = before_validate

    def resolve_checkpoint(self, resume: bool) -> None:
        """``--ckpt_path`` checked, and replaced by the file it names (Lightning then loads it)."""
        kwargs = self.config_init[self.subcommand]
        kwargs["ckpt_path"] = check_checkpoint(kwargs.get("ckpt_path"), self.trainer, self.model, resume)

    def after_fit(self) -> None:
        """The paper reports the error after the last epoch: test the final weights."""
        if self.config[self.subcommand].test_after_fit and not self.trainer.interrupted:
            self.trainer._pcn_after_fit = True  # a stop during this test says training had finished
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        print_summary(self.trainer)

    def after_validate(self) -> None:
        print_summary(self.trainer, evaluated=self.evaluated("val"))

    def after_test(self) -> None:
        print_summary(self.trainer, evaluated=self.evaluated("test"))

    def evaluated(self, split: str) -> str:
        """What ``validate`` / ``test`` evaluated: the checkpoint (or the untrained network) and
        the split, with the data's folder or file where the data module names one."""
        ckpt = self.trainer.ckpt_path
        what = (f"checkpoint {Path(ckpt).resolve()}" if ckpt
                else "the network as the config initializes it (untrained: no --ckpt_path)")
        where = getattr(self.datamodule, f"{split}_path", None)
        name = "validation" if split == "val" else "test"
        return f"{what}, on the {name} split" + (f" ({where})" if where else "") + (
            TEST_IS_VAL if split == "test" and getattr(self.datamodule, "test_is_val", False) else "")

    def close_wandb(self, status: str | None) -> None:
        """Finish the W&B run (if one started) with this command's own status in its summary, so
        that the run folder is complete when the command returns, on failure as on success."""
        trainer = getattr(self, "trainer", None)
        for logger in trainer.loggers if trainer is not None else []:
            if isinstance(logger, WandbLogger):  # Lightning's own too
                PCNWandbLogger.close(logger, status)


def describe(parser: LightningArgumentParser, command: str, with_config_values: bool) -> None:
    """``--help`` in pcn_ep's words: section headings, ``--ckpt_path`` and ``--seed_everything``
    as this package reads them, and, when the help shows the config's values, no flag called
    "required" that the config sets (``--model.network``)."""
    for key, group in parser.groups.items():
        group.title = GROUP_TITLES.get(key, group.title)
    for action in parser._actions:
        if action.dest == "ckpt_path":
            action.help = CKPT_PATH_HELP["fit" if command == "fit" else "evaluate"]
        elif action.dest == "seed_everything":
            action.help = SEED_HELP
    if with_config_values:
        defaults = parser.get_defaults()
        for action in parser._actions:
            if action.required and defaults.get(action.dest) is not None:
                action.required = False


def checkpoint_name(monitor: str | None) -> str:
    """The one name pattern of the checkpoints a config's ModelCheckpoint keeps (``filename``),
    whatever the config: epoch and step, then the monitored metric and its value, e.g.
    ``epoch07-step0736-val_top1_error0.0111.ckpt`` (``epoch07-step0736.ckpt`` without a metric).
    Epochs count from 0, as in Lightning's logs."""
    name = "epoch{epoch:02d}-step{step:04d}"
    return name + (f"-{monitor.replace('/', '_')}{{{monitor}:.4f}}" if monitor else "")


def name_checkpoints(trainer: L.Trainer) -> None:
    """Give every ModelCheckpoint whose config sets no ``filename`` the package's pattern
    (``checkpoint_name``); Lightning's default would be ``epoch=22-step=46.ckpt``."""
    for checkpoint in model_checkpoints(trainer):
        if checkpoint.filename is None:
            checkpoint.filename = checkpoint_name(checkpoint.monitor)
            checkpoint.auto_insert_metric_name = False  # the pattern names the metric itself


def check_run_folders(trainer: L.Trainer) -> None:
    """The folders a run writes (run folder, checkpoints, loggers) can be made and written, found
    before anything is created: a file in the way or a read-only parent is one line naming it."""
    folders = {checkpoint_folder(trainer): "checkpoint folder", Path(trainer.default_root_dir): "run folder"}
    folders.update({Path(logger.save_dir): f"{type(logger).__name__} folder"
                    for logger in trainer.loggers if getattr(logger, "save_dir", None)})
    for folder, what in folders.items():
        for part in [folder, *folder.parents]:
            if part.is_dir():
                if not os.access(part, os.W_OK | os.X_OK):
                    raise ValueError(f"{what} {folder}: {part} is not writable")
                break
            if part.exists() or part.is_symlink():
                raise ValueError(f"{what} {folder}: {part} is a file, not a folder")
    lock = checkpoint_folder(trainer) / ".lock"
    if lock.exists() and not lock.is_file():
        raise ValueError(f"{lock} should be the run's lock file but is a folder; remove it")


def run_status(err: BaseException) -> str:
    """The status a command that raised ``err`` ended with (``stopped``: by a signal, to be resumed)."""
    if isinstance(err, (Preempted, StopNow, SIGTERMException)):
        return "stopped"
    return "diverged" if isinstance(err, DivergenceError) else "failed"


def network_from_data(config) -> None:
    """``network_from_data``: the network takes its classes, input channels (or features) and
    input size from the data module, which is built once here to ask it."""
    data_class = import_object(config.data.class_path)
    data = data_class(**config.data.init_args.as_dict())
    if not hasattr(data, "example_shape"):
        raise ValueError(f"network_from_data: {config.data.class_path} does not say its examples' "
                         "shape (example_shape()); set the network's sizes in the config")
    shape = tuple(data.example_shape())
    network = config.model.network
    accepted = inspect.signature(import_object(network.class_path)).parameters
    derived = {"num_classes": data.num_classes, "in_features": math.prod(shape)}
    if len(shape) == 3:
        if shape[1] != shape[2]:
            raise ValueError(f"the data's images are {shape[1]}x{shape[2]}, but "
                             f"{network.class_path} takes square images (input_size)")
        derived.update(in_channels=shape[0], input_size=shape[1])
    for key, value in derived.items():
        if key in accepted:
            network.init_args[key] = value


TEST_IS_VAL = ", which is the validation split: the data has no test split of its own"


def device_name(trainer: L.Trainer) -> str:
    """The device the command ran on, in words (``accelerator: auto`` picks it)."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}) × {trainer.world_size}"
    return f"{device.type}" + (f" × {trainer.world_size} processes" if trainer.world_size > 1 else "")


def print_summary(trainer: L.Trainer, evaluated: str | None = None) -> None:
    """What a finished command leaves behind, in a few lines: after ``fit``, the test error and
    where the checkpoints are; after ``validate`` / ``test``, what was ``evaluated`` and its
    error; then where the CSV metrics and the W&B run folder are."""
    if not trainer.is_global_zero:
        return
    metrics = trainer.callback_metrics
    split = "val" if evaluated and trainer.state.fn == "validate" else "test"
    errors = [f"{name.split('/')[1].replace('_error', '')} {100 * float(metrics[name]):.2f}%"
              for name in (f"{split}/top1_error", f"{split}/top5_error") if name in metrics]
    lines = [f"device: {device_name(trainer)}"]
    lines += [f"evaluated: {evaluated}"] if evaluated else []
    data = getattr(trainer, "datamodule", None)
    also = TEST_IS_VAL if not evaluated and getattr(data, "test_is_val", False) else ""
    lines += [f"{'validation' if split == 'val' else 'test'} error: {', '.join(errors)}{also}"] if errors else []
    if evaluated is None:
        best = [c.best_model_path for c in model_checkpoints(trainer) if c.best_model_path]
        last = last_checkpoint_path(trainer)
        lines += [f"best checkpoint: {best[0]}"] if best else []
        lines += [f"last checkpoint: {last}"] if last.exists() else []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f"metrics (CSV): {(Path(logger.log_dir) / 'metrics.csv').resolve()}")
        elif isinstance(logger, WandbLogger) and logger._experiment is not None:
            # a resumed run's W&B run is the same (its id); this command's part is a new folder
            lines.append(f"W&B run folder: {Path(logger.experiment.dir).parent.resolve()} "
                         f"(W&B run {logger.experiment.id})")
            if not logger._offline:
                lines.append(f"W&B run: {logger.experiment.url}")
    if lines:
        print("\n".join(["pcn_ep: done.", *[f"  {line}" for line in lines]]))


RESUME_KEYS = ("epoch", "global_step", "loops", "optimizer_states", "lr_schedulers")


def check_checkpoint(ckpt_path: str | None, trainer: L.Trainer, model: L.LightningModule,
                     resume: bool) -> str | None:
    """Before anything runs: ``--ckpt_path`` names a checkpoint this command can use: loadable as
    data (``load_checkpoint``: never code), saved by Lightning, holding exactly this network's
    tensors, and, to resume ``fit``, the optimizer and loop states too. Everything Lightning
    would otherwise trip over later (a ``KeyError`` deep in its restore) is one line here.
    Returns the file to load: ``last`` is the run folder's ``last.ckpt``; ``best`` (validate,
    test) the best checkpoint that ``last.ckpt``'s ModelCheckpoint state records."""
    if ckpt_path in (None, "hpc", "registry"):
        return ckpt_path
    last = last_checkpoint_path(trainer)
    if ckpt_path == "best" and resume:
        raise ValueError("--ckpt_path best: fit resumes from last (--ckpt_path last) or a named file")
    if ckpt_path in ("last", "best") and not last.exists():
        if resume:  # a first run with --ckpt_path last starts fresh (reproduce's reruns rely on it)
            print(f"pcn_ep: --ckpt_path {ckpt_path}: no {last} yet, training starts from the beginning",
                  file=sys.stderr)
            return None
        raise ValueError(f"--ckpt_path {ckpt_path}: there is no {last} yet (train first, or name a "
                         "checkpoint file)")
    path = Path(best_checkpoint(last) if ckpt_path == "best" else last if ckpt_path == "last" else ckpt_path)
    saved = load_checkpoint(path)
    if not isinstance(saved.get("pytorch-lightning_version"), str):
        raise ValueError(f"--ckpt_path {path} was not saved by Lightning (no pytorch-lightning_version): "
                         "pass a checkpoint that pcn_ep wrote (checkpoints/*.ckpt)")
    if resume:
        absent = [key for key in RESUME_KEYS if key not in saved]
        if absent:
            raise ValueError(f"--ckpt_path {path} cannot resume training: it has no {absent[0]} "
                             "(saved with weights only?); evaluate it with validate or test instead")
    ours, theirs = model.state_dict(), saved["state_dict"]
    odd = next((key for key, value in theirs.items() if not isinstance(value, torch.Tensor)), None)
    if odd is not None:
        raise ValueError(f"--ckpt_path {path}: state_dict entry {odd} is a "
                         f"{type(theirs[odd]).__name__}, not a tensor")
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        what = (f"it has no {missing[0]} ({len(missing)} tensors missing)" if missing
                else f"it has {extra[0]}, which this network has not ({len(extra)} extra tensors)")
        raise ValueError(f"--ckpt_path {path} does not fit this network: {what}; another architecture?")
    for key, value in ours.items():
        if tuple(theirs[key].shape) != tuple(value.shape):
            raise ValueError(f"--ckpt_path {path} does not fit this network: {key} has shape "
                             f"{list(theirs[key].shape)} in the file, {list(value.shape)} in the network")
    return str(path)


def best_checkpoint(last: Path) -> str:
    """The best checkpoint the run's ModelCheckpoint recorded, as ``last.ckpt`` holds its state."""
    states = load_checkpoint(last).get("callbacks", {})
    best = [state.get("best_model_path") for key, state in states.items()
            if str(key).startswith("ModelCheckpoint") and isinstance(state, dict)]
    best = next((b for b in best if isinstance(b, str) and b), None)
    if best is None:
        raise ValueError(f"--ckpt_path best: {last} records no best checkpoint (its config monitors "
                         "no metric?); name a checkpoint file or use --ckpt_path last")
    if not Path(best).is_file():
        raise ValueError(f"--ckpt_path best: the best checkpoint {best} recorded in {last} is gone")
    return best


# jsonargparse's explanation of a failed union (a data module, or null) around the one real error
_UNION_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
                "Given value type:", "Given value:", "Expected a <class 'NoneType'>",
                "Expected a path but")


def one_line(err: BaseException) -> str:
    """An exception as one line; a DataLoader worker's re-raised error keeps its own message, and
    jsonargparse's union report (subtypes, a ``Namespace(...)`` dump) keeps only the real error."""
    text = str(err)
    if "Original Traceback" in text:  # "Caught X in DataLoader worker ... Traceback ... X: message"
        text = text.strip().splitlines()[-1].partition(": ")[2] or text
    lines = [line.strip().removeprefix("- ") for line in text.splitlines() if line.strip()]
    text = " ".join([line for line in lines if not line.startswith(_UNION_NOISE)] or lines)
    return re.sub(r'Parser key "([^"]+)":', r"\1:", text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loading that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def config_arguments(argv: list[str]) -> list[tuple[int, str]]:
    """(position in ``argv``, value) of each ``--config`` / ``-c`` file, in order; the position
    is the value's own (``--config FILE``) or the flag's (``--config=FILE``)."""
    return [(i + 1, value) if flag in ("-c", "--config") else (i, flag.partition("=")[2])
            for i, (flag, value) in enumerate(zip(argv, argv[1:] + [""]))
            if flag in ("-c", "--config") or flag.startswith("--config=")]


def config_paths(argv: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files named on a command line, in order."""
    return [value for _, value in config_arguments(argv)]


MAX_CONFIG_BYTES = 1 << 20  # a paper config is ~2 KB
MAX_CONFIG_NODES = 100_000  # YAML values after aliases are expanded; a paper config has ~200
SECTIONS = {"model": (dict,), "trainer": (dict,), "data": (dict, str)}  # data: a class path too


def expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` holds once every alias is expanded (as jsonargparse will), counted
    on the composed graph with each node's size remembered, so a bomb is measured, not built."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a recursive alias counts once instead of looping
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def shipped_config_paths(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` value that is not a file but names a shipped config
    (``configs/vgg10.yaml``, ``vgg10``) replaced by that file, saying so; a value that is neither
    fails, listing the shipped configs. Other paths (data roots) stay relative to the caller."""
    argv = list(argv)
    for at, given in config_arguments(argv):
        if not given or Path(given).exists():
            continue
        found = find_config(given)
        if found is None:
            raise FileNotFoundError(f"config file {given} does not exist, here or among the "
                                    f"shipped configs ({', '.join(shipped_configs())}; give one "
                                    "as --config NAME)")
        print(f"pcn_ep: config {given}: using the shipped {found}", file=sys.stderr)
        argv[at] = f"--config={found}" if argv[at].startswith("--config=") else str(found)
    return argv


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file is a readable YAML mapping of settings, without duplicate keys,
    without a top-level section of the wrong kind (``trainer: 5`` would silently drop the config's
    loggers and checkpoints), and of bounded size once its aliases are expanded."""
    for path in config_paths(argv):
        if not path:
            continue
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        if not file.is_file():
            kind = "a folder" if file.is_dir() else "not a regular file"
            raise ValueError(f"config file {path} is {kind}; give a YAML file")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"config file {path} is {file.stat().st_size:,} bytes; a config holds "
                             f"settings, at most {MAX_CONFIG_BYTES:,} bytes")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
        try:
            node = yaml.compose(text, Loader=_UniqueKeyLoader)
            if node is not None and expanded_size(node, {}) > MAX_CONFIG_NODES:
                raise ValueError(f"config file {path} expands to more than {MAX_CONFIG_NODES:,} "
                                 "values through its YAML aliases (&name / *name); refused")
            settings = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path}: {' '.join(str(err).split())}") from None
        if not isinstance(settings, dict):
            what = "empty" if settings is None else f"a {type(settings).__name__}"
            raise ValueError(f"config file {path} is {what}: a config is a mapping of settings "
                             "(model:, data:, trainer:)")
        for key, kinds in SECTIONS.items():
            if key in settings and not isinstance(settings[key], kinds):
                raise ValueError(f"config file {path}: {key} must be a mapping of settings, got "
                                 f"{settings[key]!r}")


def main(argv: list[str]) -> int:
    """``fit|validate|test [options]`` (``python -m pcn_ep`` routes the other commands)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"pcn_ep: error: expected one of {', '.join(SUBCOMMANDS)} (python -m pcn_ep --help "
              "lists every command)", file=sys.stderr)
        return 2
    if not config_paths(argv[1:]):
        argv = [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    quiet_known_noise()
    STOP.signum = 0
    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}  # a stop before training starts
    try:
        argv = shipped_config_paths(argv)
        check_config_files(argv)
        PCNCLI(argv)  # runs the command; closes W&B with its status
    except argparse.ArgumentError as err:  # unknown or misspelt key, wrong type, missing file
        print(f"pcn_ep: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"pcn_ep: {stop}", file=sys.stderr)
        return exit_code(stop.signum)
    except (StopNow, SIGTERMException) as stop:  # a second signal; Lightning's own SIGTERM stop
        signum = getattr(stop, "signum", STOP.signum or signal.SIGTERM)
        text = str(stop) or f"stopped by {signal.Signals(signum).name}"
        print(f"pcn_ep: {text}; {getattr(stop, 'on_disk', 'no checkpoint on disk')}", file=sys.stderr)
        return exit_code(signum)
    except (ValueError, FileNotFoundError, DivergenceError, MisconfigurationException,
            CheckpointWriteError, RunFolderBusy, ImportError) as err:
        print(f"pcn_ep: error: {one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # a run folder that is a file, read-only, a lock of the wrong kind, ...
        print(f"pcn_ep: error: {os_error(err)}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if STOP.signum:  # a signal after the command's last step and check: its work is all saved
        print(f"pcn_ep: stopped by {signal.Signals(STOP.signum).name} as the command ended "
              "(everything it had to save was saved)", file=sys.stderr)
        return exit_code(STOP.signum)
    return 0


def os_error(err: OSError) -> str:
    """An OS error as one line naming the file (``PermissionError: [Errno 13] ...`` reads worse)."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"{where}: {err.strerror or err}" if where else (err.strerror or str(err))


class _DropNotices(logging.Filter):
    """Lightning's notices that say nothing about this run: the litlogger advertisement, and the
    notice that the module's own callbacks (Preemption, LastCheckpoint, RunFolderLock) replace
    those of the same type, printed again by the ``test`` that follows ``fit``."""

    OURS = {"LastCheckpoint", "Preemption", "RunFolderLock"}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip:") and "litlogger" in message:
            return False
        if message.startswith("Trainer already configured with model summary callbacks"):
            return False  # ours (callbacks.ModelSummary), given to every trainer by the CLI
        notice = "will override existing callbacks passed to Trainer: "
        if notice in message:
            return not set(message.split(notice)[1].split(", ")) <= self.OURS
        return True


def quiet_known_noise() -> None:
    """Silence the harmless messages Lightning prints on every run with this torch."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11, each loader
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())

"""Every paper-run config in configs/ resolves, through the real CLI, to the paper's hyperparameters.

The expected values are written here once, from the spec's Table 7 (VGG5, Table 1 and Fig. 1) and
Table 8 (VGG10 / VGG10Skip, Table 2 and §5.5), and compared with ``--print_config`` output, so a typo
in a config, a renamed key or a changed default fails here. A new ``vgg5_*`` / ``vgg10*`` config
without an entry below fails too.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pcn_ep.training.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# -- Table 7: VGG5 (Table 1; Fig. 1 reuses it) ----------------------------------------------------
TABLE7 = {"beta": 0.02, "K": 5, "rule": "mod-pgd", "order": "async", "alpha": 1.0,
          "momentum": 0.9, "nesterov": True, "weight_decay": 3.0e-4,
          "max_epochs": 100, "t_max": 100, "eta_min": 1.0e-6}
TABLE7_LR = {"mse": 0.04, "ce": 0.01}
TABLE7_BATCH = {("mse", "mnist"): 16, ("mse", "cifar10"): 16, ("mse", "cifar100"): 16,
                ("mse", "imagenet32"): 256,
                ("ce", "mnist"): 64, ("ce", "cifar10"): 64, ("ce", "cifar100"): 64,
                ("ce", "imagenet32"): 256}
# Table 5: input channels and classes; App. B.2: fan_in convs, gain 1 except the output layer of
# VGG5 + ImageNet32 + MSE (gain 0.2, Fig. 3).
VGG5_DATA = {"mnist": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100), "imagenet32": (3, 1000)}
VGG5_OUTPUT_GAIN = {("imagenet32", "mse"): 0.2}

# -- Table 8: VGG10 on ImageNet (Table 2; VGG10Skip in §5.5) --------------------------------------
TABLE8 = {"beta": 0.05, "K": 10, "rule": "mod-pgd", "order": "async", "alpha": 1.0, "cost": "ce",
          "lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 2.0e-4,
          "batch_size": 256, "max_epochs": 50, "t_max": 50, "eta_min": 2.0e-6}

EP_ONLY = ("perturbation", "scheme", "beta", "K", "rule", "order", "alpha")


def vgg5(dataset: str, cost: str, algorithm: str = "ep", perturbation: str = "nudge") -> dict:
    channels, classes = VGG5_DATA[dataset]
    return {
        "network": "pcn_ep.core.VGG5", "in_channels": channels, "num_classes": classes,
        "input_size": 32, "conv_fan_mode": "fan_in", "gain": 1.0,
        "output_gain": VGG5_OUTPUT_GAIN.get((dataset, cost), 1.0),
        "algorithm": algorithm, "cost": cost, "perturbation": perturbation, "scheme": "centered",
        "lr": TABLE7_LR[cost], "batch_size": TABLE7_BATCH[(cost, dataset)],
        "data": "pcn_ep.data.ImageDataModule", "dataset": dataset, **TABLE7,
    }


def vgg10(network: str, algorithm: str = "ep", scheme: str = "centered") -> dict:
    return {
        "network": f"pcn_ep.core.{network}", "in_channels": 3, "num_classes": 1000,
        "input_size": 224, "conv_fan_mode": "fan_out", "gain": 1.0, "output_gain": 1.0,
        "algorithm": algorithm, "perturbation": "nudge", "scheme": scheme,
        "data": "pcn_ep.data.ImageNetDataModule", **TABLE8,
    }


EXPECTED = {}
for _dataset in VGG5_DATA:
    for _cost in TABLE7_LR:
        EXPECTED[f"vgg5_{_dataset}_{_cost}"] = vgg5(_dataset, _cost)
        EXPECTED[f"vgg5_{_dataset}_{_cost}_bp"] = vgg5(_dataset, _cost, "bp")
for _dataset in ("cifar100", "imagenet32"):  # Fig. 1's Clamp arm, on the MSE recipe [?]
    EXPECTED[f"vgg5_{_dataset}_clamp"] = vgg5(_dataset, "mse", perturbation="clamp")
EXPECTED.update({
    "vgg10": vgg10("VGG10"),
    "vgg10_random": vgg10("VGG10", scheme="random"),
    "vgg10_bp": vgg10("VGG10", "bp"),
    "vgg10skip": vgg10("VGG10Skip"),
    "vgg10skip_bp": vgg10("VGG10Skip", "bp"),
})

# Where each expected key lives in the resolved config.
WHERE = {
    "network": "model.network.class_path", "data": "data.class_path",
    "max_epochs": "trainer.max_epochs",
    **{k: f"model.network.init_args.{k}" for k in
       ("in_channels", "num_classes", "input_size", "conv_fan_mode", "gain", "output_gain")},
    **{k: f"data.init_args.{k}" for k in ("dataset", "batch_size")},
}


_RESOLVED: dict[str, dict] = {}


def resolved(name: str, capsys) -> dict:
    """The config as ``python -m pcn_ep fit --config FILE --print_config`` resolves it (parsed once
    per session: both tests below read it)."""
    if name in _RESOLVED:
        return _RESOLVED[name]
    capsys.readouterr()
    try:
        code = main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"{name}.yaml does not parse (exit {code}): {err.strip()}"
    _RESOLVED[name] = yaml.safe_load(out)
    return _RESOLVED[name]


def lookup(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


def test_every_paper_config_has_an_entry():
    found = {p.stem for pattern in ("vgg5_*.yaml", "vgg10*.yaml") for p in CONFIGS.glob(pattern)}
    assert found == set(EXPECTED), (f"configs without an entry: {sorted(found - set(EXPECTED))}; "
                                    f"entries without a config: {sorted(set(EXPECTED) - found)}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_matches_the_paper(name, capsys):
    config = resolved(name, capsys)
    expected = EXPECTED[name]
    if expected["algorithm"] == "bp":  # backprop ignores the EP-only keys
        expected = {k: v for k, v in expected.items() if k not in EP_ONLY}
    if expected.get("data") != "pcn_ep.data.ImageDataModule":
        expected = {k: v for k, v in expected.items() if k != "dataset"}
    wrong = {}
    for key, want in expected.items():
        got = lookup(config, WHERE.get(key, f"model.{key}"))
        if got != want or type(got) is not type(want):
            wrong[key] = (got, want)
    assert not wrong, f"{name}.yaml (got, paper): {wrong}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_writes_to_its_own_run_folder(name, capsys):
    """One folder per config and seed (two seeds never share a last.ckpt), and seed_everything
    seeds the data order and the sign generator too."""
    config = resolved(name, capsys)
    trainer = config["trainer"]
    run = f"runs/{name}/seed0"
    assert config["seed_everything"] == 0
    assert config["model"]["seed"] == 0 and config["data"]["init_args"]["seed"] == 0
    assert trainer["default_root_dir"] == run
    assert {lg["init_args"]["save_dir"] for lg in trainer["logger"]} == {run}
    wandb, = [lg for lg in trainer["logger"] if lg["class_path"] == "pcn_ep.training.loggers.WandbLogger"]
    # the W&B group of `reproduce/TABLE.sh` runs of the same table
    group = ("table_schemes" if "clamp" in name else "table_costs" if name.startswith("vgg5")
             else "table_top5")
    assert wandb["init_args"]["group"] == group
    checkpoint, = [cb for cb in trainer["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    assert checkpoint["init_args"]["dirpath"] == f"{run}/checkpoints"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")
                                        if p.stem not in EXPECTED and p.stem != "smoke"))
def test_every_other_config_parses(name, capsys):
    """The quickstart, ImageFolder and parity configs (smoke.yaml is an overlay:
    tests/test_reproduce.py)."""
    assert resolved(name, capsys)["model"]["network"]["class_path"].startswith("pcn_ep.core.")


@pytest.mark.parametrize("name", ["quickstart", "quickstart_bp", "imagefolder"])
def test_the_user_configs_write_to_a_folder_of_their_name_and_seed(name, capsys):
    trainer = resolved(name, capsys)["trainer"]
    run = f"runs/{name}/seed0"
    assert trainer["default_root_dir"] == run
    assert {lg["init_args"]["save_dir"] for lg in trainer["logger"]} == {run}
    wandb, = [lg for lg in trainer["logger"] if lg["class_path"].endswith("WandbLogger")]
    assert wandb["init_args"]["group"] == name.removesuffix("_bp")  # EP and BP twins side by side


def test_seed_everything_moves_every_seed_and_the_run_folder_unless_set(capsys):
    """The finding: ``--seed_everything 3`` alone left the data order and the random scheme's
    signs at 0 and wrote into the same folder as seed 0."""
    def resolve(*extra):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(CONFIGS / "vgg10_random.yaml"), *extra, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    config = resolve("--seed_everything", "3")
    assert config["model"]["seed"] == 3 and config["data"]["init_args"]["seed"] == 3
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == "runs/vgg10_random/seed3"
    checkpoint, = [cb for cb in trainer["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    assert checkpoint["init_args"]["dirpath"] == "runs/vgg10_random/seed3/checkpoints"
    explicit = resolve("--seed_everything", "3", "--model.seed", "7", "--data.init_args.seed", "8",
                       "--trainer.default_root_dir", "elsewhere")
    assert (explicit["model"]["seed"], explicit["data"]["init_args"]["seed"]) == (7, 8)
    assert {lg["init_args"]["save_dir"] for lg in explicit["trainer"]["logger"]} == {"elsewhere"}

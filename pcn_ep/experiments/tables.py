"""Every paper table and figure as data: a ``Table`` is a list of ``Cell``s, each a paper config
(``configs/*.yaml``) plus the overrides that make it that cell. The runner (``reproduce``) and the
report (``report``) both read ``TABLES``; neither needs the other to know what a table is."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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

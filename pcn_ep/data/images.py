"""Image data sets held in memory as uint8 tensors (MNIST, CIFAR-10/100, ImageNet32), read from a
local root in each data set's own on-disk format, normalized and augmented on the device.

Normalization statistics are the paper's Table 4. Augmentation (spec §6): random crop with 4 px
zero padding and horizontal flip for CIFAR and ImageNet32 training, none for MNIST (padded by 2 to
32×32) and never at test time. The per-batch augmentation draws from (seed, global step), so a
resumed run replays it.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TensorDataModule, step_generator

STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 NCHW → float, (x/255 − mean) / std per channel (on whatever device x lives)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def random_crops(x: Tensor, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """A random ``size`` window of every image in the batch (one offset per example)."""
    n, c, h, w = x.shape
    offsets = torch.randint(0, max(h - size[0], w - size[1]) + 1, (n, 2), generator=generator)
    offsets = torch.minimum(offsets, torch.tensor([h - size[0], w - size[1]]))
    rows = (offsets[:, 0, None] + torch.arange(size[0])).to(x.device)  # n × size[0]
    cols = (offsets[:, 1, None] + torch.arange(size[1])).to(x.device)  # n × size[1]
    return x[torch.arange(n, device=x.device)[:, None, None, None],
             torch.arange(c, device=x.device)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-example random crop of the zero-padded image (back to its size) and horizontal flip."""
    if padding:
        x = random_crops(F.pad(x, (padding,) * 4), tuple(x.shape[-2:]), generator)
    if flip:
        mirror = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def _unpickle(path: Path) -> dict:
    try:
        with open(_require(path), "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"corrupt data file {path}: {err}") from err


def read_cifar(root: Path, classes: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The python-version archives' layout: ``cifar-10-batches-py/data_batch_1..5, test_batch`` or
    ``cifar-100-python/train, test``. (torchvision's reader insists on the official archives' MD5
    checksums; this one reads any file in the same format.)"""
    if classes == 10:
        folder, parts = root / "cifar-10-batches-py", {
            "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    else:
        folder, parts, key = root / "cifar-100-python", {"train": ["train"], "test": ["test"]}, \
            "fine_labels"
    splits = {}
    for split, names in parts.items():
        batches = [_unpickle(folder / name) for name in names]
        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b[key] for b in batches])
        splits[split] = (torch.from_numpy(x.copy()), torch.from_numpy(y).long())
    return splits


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"corrupt data file {path}: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def read_mnist(root: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """The idx files as torchvision lays them out: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}
    -ubyte`` (optionally ``.gz``)."""
    raw = root / "MNIST" / "raw"
    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        files = []
        for kind in ("images-idx3", "labels-idx1"):
            path = raw / f"{stem}-{kind}-ubyte"
            files.append(path if path.exists() else _require(path.with_name(path.name + ".gz")))
        x, y = _read_idx(files[0]), _read_idx(files[1])
        x = F.pad(torch.from_numpy(x.copy()).unsqueeze(1), (2, 2, 2, 2))  # 28 → 32 (spec §6)
        splits[split] = (x, torch.from_numpy(y.copy()).long())
    return splits


def read_imagenet32(root: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Downsampled ImageNet (Chrabaszcz et al. 2017): pickles ``train_data_batch_1..10`` and
    ``val_data`` with ``data`` (N × 3072 uint8, channel-major) and 1-based ``labels``."""
    def load(names):
        batches = [_unpickle(root / n) for n in names]
        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b["labels"]) for b in batches]) - 1
        return torch.from_numpy(x.copy()), torch.from_numpy(y).long()

    return {"train": load([f"train_data_batch_{i}" for i in range(1, 11)]),
            "test": load(["val_data"])}


class ImageDataModule(TensorDataModule):
    """MNIST, CIFAR-10, CIFAR-100 or ImageNet32 from ``root`` (no download: files must be there).

    Args:
        dataset: ``mnist``, ``cifar10``, ``cifar100`` or ``imagenet32``.
        root: the folder that holds the data set's files (see the ``read_*`` functions).
        val_size: examples held out of the training split for validation (0: validate on test).
        batch_size, seed, drop_last: see ``TensorDataModule``.
    """

    DATASETS = {"mnist": (10, "mnist", 0, False), "cifar10": (10, "cifar10", 4, True),
                "cifar100": (100, "cifar100", 4, True), "imagenet32": (1000, "imagenet", 4, True)}

    def __init__(self, dataset: str, root: str, val_size: int = 0, batch_size: int = 64,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(batch_size, seed, drop_last)
        if dataset not in self.DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(self.DATASETS)}")
        self.dataset, self.root, self.val_size = dataset, Path(root), val_size
        self.num_classes, stats, self.padding, self.flip = self.DATASETS[dataset]
        self.mean, self.std = STATS[stats]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root not found: {self.root}")
        reader = {"mnist": read_mnist, "imagenet32": read_imagenet32}.get(self.dataset)
        splits = reader(self.root) if reader else read_cifar(self.root, self.num_classes)
        labels = torch.cat([splits["train"][1], splits["test"][1]])
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"{self.dataset} labels outside 0..{self.num_classes - 1} in {self.root}")
        if self.val_size:
            x, y = splits["train"]
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
            val, train = order[: self.val_size], order[self.val_size:]
            splits = {"train": (x[train], y[train]), "val": (x[val], y[val]),
                      "test": splits["test"]}
        else:
            splits["val"] = splits["test"]
        self.splits = splits

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = self.trainer
        if trainer is not None and trainer.training and (self.padding or self.flip):
            x = random_crop_flip(x, self.padding, self.flip, step_generator(self.seed, trainer))
        return normalize(x, self.mean, self.std), y

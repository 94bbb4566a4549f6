"""The embedded default data: scikit-learn's 1,797 real 8×8 handwritten digits (no download)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TensorDataModule, step_generator


class DigitsDataModule(TensorDataModule):
    """``sklearn.datasets.load_digits``, split once with a fixed seed, upsampled and normalized.

    Args:
        image_size: side after bilinear upsampling from 8 (16 or 32 suit the VGG nets' pools).
        val_fraction: share of the 1,797 images held out for validation (stratified by class).
        test_fraction: share of the images held out for testing (stratified by class).
        flatten: give vectors instead of 1×S×S images (for an MLP).
        max_shift: training augmentation, a random translation of up to this many pixels per axis
            (after upsampling; 0 = off). Drawn from (seed, global step): resuming replays it.
        batch_size: per-process batch size.
        seed: seeds the split, the shuffling and the shifts (the configs: ``${seed_everything}``).
        drop_last: drop the last incomplete training batch.
    """

    num_classes = 10

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
            raise ValueError(f"image_size must be >= 8 (the digits are 8×8), got {image_size}")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be positive and sum below 1")
        if max_shift < 0 or (max_shift and flatten):
            raise ValueError("max_shift must be >= 0 and needs images (flatten: false)")
        self.image_size, self.flatten, self.max_shift = image_size, flatten, max_shift
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
        self.set_splits({name: (x[i], y[i]) for name, i in
                         (("train", train), ("val", val), ("test", test))},
                        "scikit-learn's digits")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if not self.max_shift or trainer is None or not trainer.training:
            return batch
        x, y = batch
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (len(x), 2),
                               generator=step_generator(self.seed, trainer))
        return random_translate(x, shifts.to(x.device)), y


def random_translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image by integer pixels (dx, dy), repeating the border (the background)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shifts[:, 0].to(x.dtype) / w
    theta[:, 1, 2] = -2 * shifts[:, 1].to(x.dtype) / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)

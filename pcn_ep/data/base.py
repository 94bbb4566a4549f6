"""In-memory data modules: the whole split lives in tensors (tiny data sets train in seconds)."""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset


class EpochShuffle(Sampler[int]):
    """A random order that depends only on (seed, epoch): resuming replays the same batches.

    Lightning calls ``set_epoch`` at the start of every epoch; torch's ``RandomSampler`` would
    instead draw from the global RNG, whose state a checkpoint does not restore.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def step_generator(seed: int, trainer: L.Trainer) -> torch.Generator:
    """The RNG of a training batch's augmentation: a function of (seed, global step, rank), so a
    resumed run replays it and DDP ranks draw differently."""
    return torch.Generator().manual_seed(
        seed * 1_000_003 + trainer.global_step + trainer.global_rank * 2**40)


class TensorDataModule(L.LightningDataModule):
    """Train/val/test splits held as tensors; subclasses fill ``self.splits`` in ``setup``.

    Args:
        batch_size: per-process batch size.
        seed: seeds the split and the shuffling.
        drop_last: drop the last incomplete training batch.
    """

    num_classes: int

    def __init__(self, batch_size: int = 32, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def _loader(self, split: str, train: bool) -> DataLoader:
        x, y = self.splits[split]
        if train and self.drop_last and len(y) < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(y)} training examples "
                             "and drop_last is set: no batch would be left")
        sampler = EpochShuffle(len(y), self.seed) if train else None
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, sampler=sampler,
                          drop_last=train and self.drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

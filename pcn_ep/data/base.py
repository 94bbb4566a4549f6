"""In-memory data modules: the whole split lives in tensors (tiny data sets train in seconds).

Every data module in this package offers, after ``setup``, ``num_classes`` (labels are class
indices 0..num_classes−1) and ``example_shape()`` (the shape of one input, (C, H, W) for images,
(D,) for vectors), so that a model can check that it fits the data before training. Bad data ends
in one ``DataError`` whose first line names the file or value and the problem.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader


class DataError(ValueError):
    """A data file or value that cannot be used; the message's first line names it and the problem.

    A DataLoader worker re-raises an exception as ``DataError("Caught DataError in DataLoader
    worker process 0.\nOriginal Traceback ...")``: the original message is moved to the first line.
    """

    def __init__(self, message: str = "") -> None:
        if message.startswith("Caught DataError"):
            original = message.rpartition("DataError: ")[2].strip()
            message = f"{original}\n{message}" if original else message
        super().__init__(message)


def check_split(split: str, x: Tensor, y: Tensor, num_classes: int, source: str) -> None:
    """One cheap pass over a split: as many inputs as labels, integer labels in
    0..num_classes−1, finite inputs. Raises a ``DataError`` naming the split and its source."""
    where = f"{split} split of {source}"
    if len(y) == 0 or len(x) != len(y) or y.dim() != 1:
        raise DataError(f"{where}: {len(x)} inputs and labels of shape {tuple(y.shape)}; "
                        "expected as many labels as inputs, at least one")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}: labels must be integer class indices, got {y.dtype}")
    bad = ((y < 0) | (y >= num_classes)).nonzero().flatten()
    if len(bad):
        raise DataError(f"{where}: label {y[bad[0]].item()} of example {bad[0].item()} is outside "
                        f"0..{num_classes - 1} ({len(bad)} such labels)")
    if x.is_floating_point():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
        if len(bad):
            raise DataError(f"{where}: example {bad[0].item()} has non-finite values (NaN or "
                            f"infinity; {len(bad)} such examples)")


class EpochShuffle(DistributedSampler):
    """A random order that depends only on (seed, epoch), shared by the DDP ranks, each reading its
    own shard, and that knows where it is in it.

    Lightning calls ``set_epoch`` at the start of every epoch; torch's ``RandomSampler`` would
    instead draw from the global RNG, whose state a checkpoint does not restore. The position
    (``state_dict``: the epoch and how many indices this rank has yielded, the same on every rank)
    travels in the checkpoint through torchdata's ``StatefulDataLoader``, so a run stopped after
    any step resumes with the next example of the same order, on every rank.

    Under DDP (a process group exists when the loader iterates) rank r of R reads positions r,
    r + R, ... of the order, padded with its first examples to a multiple of R, as torch's
    ``DistributedSampler`` does; being one, it is not wrapped in another by Lightning.
    ``with_epoch``: yield (epoch, index) pairs, for ``SeededAugmentation``.
    """

    def __init__(self, size: int, seed: int, with_epoch: bool = False) -> None:
        # DistributedSampler's own __init__ wants a process group at construction: not needed,
        # the shard is read from the group at iteration time
        self.size, self.seed, self.epoch, self.with_epoch = size, seed, 0, with_epoch
        self.yielded = 0
        self._resume: dict[str, int] | None = None

    @staticmethod
    def _ranks() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # a generator: the order is drawn at the first index, after Lightning's set_epoch; a saved
        # position applies only to the epoch it was saved in (Lightning may resume into the next)
        resume, self._resume = self._resume, None
        start = resume["yielded"] if resume and resume["epoch"] == self.epoch else 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch)).tolist()
        rank, ranks = self._ranks()
        order = (order * ranks)[:len(self) * ranks][rank::ranks]
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield (self.epoch, index) if self.with_epoch else index

    def __len__(self) -> int:
        return -(-self.size // self._ranks()[1])

    def state_dict(self) -> dict[str, int]:
        return {"sampler": "EpochShuffle", "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # the epoch now: a loader with workers draws its first indices before Lightning's set_epoch
        self.epoch, self._resume = state["epoch"], dict(state)


def finish_epoch(loader_state):
    """Mark every ``EpochShuffle`` position in a saved loader state as the start of the next epoch.
    Called for a checkpoint saved after an epoch's last step: Lightning then resumes into the next
    epoch, and only it knows where an epoch ends (``limit_train_batches`` may end it early)."""
    if isinstance(loader_state, dict):
        if loader_state.get("sampler") == "EpochShuffle":
            loader_state.update(epoch=loader_state["epoch"] + 1, yielded=0)
        for value in loader_state.values():
            finish_epoch(value)
    elif isinstance(loader_state, (list, tuple)):
        for value in loader_state:
            finish_epoch(value)


class SeededAugmentation(Dataset):
    """A data set whose random transforms draw from a seed of (seed, epoch, index), not from the
    loader worker's RNG stream: an example's augmentation is then the same whichever worker
    decodes it and wherever a run was resumed (a resumed loader's workers start new streams).
    Keys are the (epoch, index) pairs of ``EpochShuffle(with_epoch=True)``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 100_000_007 + index)
            return self.dataset[index]


def step_generator(seed: int, trainer: L.Trainer) -> torch.Generator:
    """The RNG of a training batch's augmentation: a function of (seed, global step, rank), so a
    resumed run replays it and DDP ranks draw differently."""
    return torch.Generator().manual_seed(
        seed * 1_000_003 + trainer.global_step + trainer.global_rank * 2**40)


class TensorDataModule(L.LightningDataModule):
    """Train/val/test splits held as tensors; subclasses fill them in ``setup`` with ``set_splits``,
    which checks each split once (labels in range, finite inputs).

    After ``setup``: ``num_classes`` and ``example_shape()`` (see the module docstring).

    Args:
        batch_size: per-process batch size.
        seed: seeds the split and the shuffling (the order depends only on seed and epoch).
        drop_last: drop the last incomplete training batch.
    """

    num_classes: int

    def __init__(self, batch_size: int = 32, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def test_is_val(self) -> bool:
        """Whether ``test`` evaluates the validation split (a data set without a third split):
        the summary says so, as that split also chose the best checkpoint."""
        return bool(self.splits) and self.splits["test"][0] is self.splits["val"][0]

    def set_splits(self, splits: dict[str, tuple[Tensor, Tensor]],
                   sources: str | dict[str, str]) -> None:
        """Keep ``splits`` (train, val, test) after checking each once (a split that reuses an
        earlier one's tensors is not checked again); ``sources`` names where each split came from
        (a file, a folder, a generator) for the error message."""
        checked = []
        for split, (x, y) in splits.items():
            if not any(x is a and y is b for a, b in checked):
                source = sources if isinstance(sources, str) else sources[split]
                check_split(split, x, y, self.num_classes, source)
                checked.append((x, y))
        self.splits = splits

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one input, (C, H, W) or (D,); sets the module up if it is not yet."""
        if not self.splits:
            self.setup()
        return tuple(self.splits["train"][0].shape[1:])

    def _loader(self, split: str, train: bool) -> DataLoader:
        x, y = self.splits[split]
        if train and self.drop_last and len(y) < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(y)} training examples "
                             "and drop_last is set: no batch would be left")
        if not train:
            return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)
        return StatefulDataLoader(TensorDataset(x, y), batch_size=self.batch_size,
                                  sampler=EpochShuffle(len(y), self.seed), drop_last=self.drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

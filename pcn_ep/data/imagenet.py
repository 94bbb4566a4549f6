"""Full-size ImageNet at 224×224, from FFCV .beton files or from ImageFolder trees.

Both backends decode and crop on the loader side and hand uint8 NCHW batches to the device, where
``on_after_batch_transfer`` normalizes them with the paper's Table 4 statistics, so they give
batches of the same shape, dtype and normalization.

Crop recipe (the paper does not state it; ours is the standard torchvision / FFCV
ImageNet recipe, configurable):

- train, ``train_crop: random_resized`` (default): RandomResizedCrop to 224, scale (``min_scale``, 1),
  aspect ratio (3/4, 4/3), then horizontal flip;
- train, ``train_crop: random``: resize the short side to ``val_resize`` (256), center 256², random
  224² crop (done on the device), horizontal flip;
- validation / test: resize the short side to 256 and center-crop 224 (FFCV: crop ratio 224/256);
  at another ``image_size`` the resize follows it (``val_resize``: image_size × 8/7 unless set).

Batch size is per process: under DDP with N GPUs the global batch is N × ``batch_size`` (the paper
ran batch 256 on one GPU; for the same global batch on 8 GPUs use 32, or keep 256 per GPU and scale
the learning rate linearly, 0.02 × 8, as a starting point). With FFCV the loaders are built inside
the dataloader hooks, after the process group exists, with ``distributed=True`` under DDP; each
rank reads 1/N of every epoch.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .base import DataError, EpochShuffle, SeededAugmentation, step_generator
from .images import STATS, normalize, random_crops

MEAN, STD = STATS["imagenet"]
GRAY = ((sum(MEAN) / 3,), (sum(STD) / 3,))  # one-channel images: the mean of the channels' statistics


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet (or any ImageFolder-shaped data set) for the VGG10 runs.

    Args:
        train_path: the training .beton file (``backend: ffcv``, written by ``python -m pcn_ep
            write-ffcv``) or ImageFolder root (``backend: folder``).
        val_path: the validation .beton file or ImageFolder root; it also serves ``test``.
        backend: ``ffcv`` (.beton files) or ``folder`` (torchvision ImageFolder trees).
        num_classes: classes the data must have (checked against the labels of the folder / file).
        image_size: side of the square crop the network sees.
        val_resize: evaluation resizes the short side to this, then center-crops ``image_size``;
            null: ``image_size`` × 8/7 (256 at 224).
        train_crop: ``random_resized`` or ``random`` (the crop recipe above).
        min_scale: the smallest area fraction a ``random_resized`` training crop covers.
        batch_size: per process (the global batch is the number of processes times this).
        num_workers: decoding workers per process.
        drop_last: drop the last incomplete training batch (FFCV's ImageNet recipe does).
        os_cache: FFCV reads through the OS page cache (fast when the file fits in RAM).
        seed: seeds FFCV's shuffling and the device-side random crops.

    ``setup`` checks the paths, that FFCV is installed, the class count and that the labels are in
    range; an unreadable image in a folder fails when loaded, naming the file. ``num_classes`` and
    ``example_shape()`` (3, image_size, image_size) describe the batches.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str,
        backend: str = "ffcv",
        num_classes: int = 1000,
        image_size: int = 224,
        val_resize: int | None = None,
        train_crop: str = "random_resized",
        min_scale: float = 0.08,
        batch_size: int = 256,
        num_workers: int = 8,
        drop_last: bool = True,
        os_cache: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if backend not in ("ffcv", "folder"):
            raise ValueError(f"backend must be 'ffcv' or 'folder', got {backend!r}")
        if train_crop not in ("random_resized", "random"):
            raise ValueError(f"train_crop must be 'random_resized' or 'random', got {train_crop!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        val_resize = round(image_size * 8 / 7) if val_resize is None else val_resize
        if val_resize < image_size:
            raise ValueError(f"val_resize {val_resize} is smaller than image_size {image_size}: "
                             "evaluation could not crop the image (leave val_resize null)")
        self.train_path, self.val_path = Path(train_path), Path(val_path)
        self.test_path = self.val_path
        self.backend, self.num_classes, self.channels = backend, num_classes, 3
        self.image_size, self.val_resize = image_size, val_resize
        self.train_crop, self.min_scale = train_crop, min_scale
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.os_cache, self.seed = os_cache, seed

    # -- checks ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """The paths, the class folders (each with an image, the same in every split) or the
        .beton labels. Lightning calls this before the model summary and the loggers' start, so
        bad data ends the command with nothing begun."""
        for key in ("train_path", "val_path"):
            path = getattr(self, key)
            if not path.exists():
                raise FileNotFoundError(f"ImageNet data not found: {path} "
                                        f"(check data.init_args.{key})")
            if path.is_dir() != (self.backend == "folder"):
                raise DataError(f"{path} is a {'folder' if path.is_dir() else 'file'} but backend "
                                f"is {self.backend!r}: the ffcv backend reads a .beton file, the "
                                "folder backend an ImageFolder tree (check data.init_args.backend)")
        if self.backend == "folder":
            classes = check_class_folders(self.train_path, "train")
            if len(classes) != self.num_classes:
                raise DataError(f"{self.train_path} has {len(classes)} classes, num_classes is "
                                f"{self.num_classes}")
            checked = {self.train_path}
            for split, path in (("val", self.val_path), ("test", self.test_path)):
                if path not in checked:  # test is often val: one scan
                    check_class_folders(path, split, like=(self.train_path, classes))
                    checked.add(path)
        else:
            for path in {self.train_path, self.val_path}:
                labels = _beton_labels(path)
                bad = labels[(labels < 0) | (labels >= self.num_classes)]
                if len(bad):
                    raise DataError(f"{path}: label {bad[0]} is outside 0..{self.num_classes - 1} "
                                    f"({len(bad)} such labels)")

    @property
    def test_is_val(self) -> bool:
        """Whether ``test`` evaluates the validation data (no test split of its own)."""
        return self.test_path == self.val_path

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one normalized input: (channels, image_size, image_size), both backends."""
        return (self.channels, self.image_size, self.image_size)

    # -- loaders -----------------------------------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def _ffcv_loader(self, path: Path, train: bool):
        from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder,
                                          RandomResizedCropRGBImageDecoder)
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        if train and self.train_crop == "random_resized":
            decoder = RandomResizedCropRGBImageDecoder((self.image_size,) * 2,
                                                       scale=(self.min_scale, 1.0))
        elif train:
            decoder = CenterCropRGBImageDecoder((self.val_resize,) * 2, ratio=1.0)
        else:
            decoder = CenterCropRGBImageDecoder((self.image_size,) * 2,
                                                ratio=self.image_size / self.val_resize)
        image = [decoder] + ([RandomHorizontalFlip()] if train else []) + [ToTensor(),
                                                                           ToTorchImage()]
        try:
            loader = Loader(
                str(path), batch_size=self.batch_size, num_workers=self.num_workers,
                # training: FFCV's RANDOM order, resumable (ResumableFFCVLoader, below)
                order=_resumable_random()() if train else OrderOption.SEQUENTIAL,
                drop_last=train and self.drop_last, os_cache=self.os_cache,
                distributed=self._distributed, seed=self.seed,
                pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze(1)]},
            )
        except Exception as err:  # FFCV reports a corrupt header as assorted low-level errors
            raise DataError(f"cannot read FFCV file {path}: {type(err).__name__}: {err}") from err
        return ResumableFFCVLoader(loader) if train else loader

    def _folder_loader(self, path: Path, train: bool) -> DataLoader:
        from torchvision.transforms import v2

        if train and self.train_crop == "random_resized":
            crop = [v2.RandomResizedCrop(self.image_size, scale=(self.min_scale, 1.0),
                                         antialias=True)]
        elif train:
            crop = [v2.Resize(self.val_resize, antialias=True), v2.CenterCrop(self.val_resize)]
        else:
            crop = [v2.Resize(self.val_resize, antialias=True), v2.CenterCrop(self.image_size)]
        flip = [v2.RandomHorizontalFlip()] if train else []
        color = [v2.RGB()] if self.channels == 3 else [v2.Grayscale()]
        dataset = ImageFolder(str(path), loader=_decode, transform=v2.Compose(
            [v2.PILToTensor()] + color + crop + flip))
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if not train:
            return DataLoader(dataset, batch_size=self.batch_size, **workers)
        # The order is a function of (seed, epoch) and its position travels in checkpoints; each
        # example's augmentation of (seed, epoch, index): a resume continues bitwise (one process).
        # Under DDP the sampler reads this rank's shard, padded with repeated examples so that
        # every rank gets the same number of batches, as torch's DistributedSampler does.
        return StatefulDataLoader(SeededAugmentation(dataset, self.seed), batch_size=self.batch_size,
                                  sampler=EpochShuffle(len(dataset), self.seed, with_epoch=True),
                                  drop_last=self.drop_last, **workers)

    def _loader(self, path: Path, train: bool):
        if self.backend == "ffcv":
            return self._ffcv_loader(path, train)
        return self._folder_loader(path, train)

    def train_dataloader(self):
        return self._loader(self.train_path, True)

    def val_dataloader(self):
        return self._loader(self.val_path, False)

    def test_dataloader(self):
        return self._loader(self.test_path, False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = self.trainer
        if self.train_crop == "random" and trainer is not None and trainer.training:
            x = random_crops(x, (self.image_size, self.image_size),
                             step_generator(self.seed, trainer))
        return normalize(x, *((MEAN, STD) if self.channels == 3 else GRAY)), y.long().view(-1)


# -- FFCV: a training loader that resumes where it stopped ----------------------------------------
# FFCV's Loader has no state to save, and a new one starts at its epoch 0: a resumed run would see
# epoch 0's order again, from its first batch. Here the order is FFCV's RANDOM one, a function of
# (seed, epoch) (under DDP this rank's shard of it, as torch's DistributedSampler pads and deals
# it), and the loader keeps its position as EpochShuffle does, {"sampler": "EpochShuffle", "epoch",
# "yielded"} (``finish_epoch`` moves it to the next epoch's start), which Lightning saves in
# checkpoints: a resumed epoch skips the examples already yielded in the order itself, without
# decoding them. FFCV's random crops and flips are not seeded: a resume gives the same examples in
# the same batches, not bitwise the same pixels.

@functools.cache
def _resumable_random():
    """The class of FFCV's RANDOM order with a resume point (defined on first use: FFCV is an
    optional dependency)."""
    from ffcv.traversal_order import Random

    class ResumableRandom(Random):
        """FFCV's RANDOM order of Lightning's epoch (``set_epoch``), less its first ``skip``
        examples (this rank's, under DDP). FFCV 1.0.2's ``Loader(order=...)`` takes a
        TraversalOrder instance and calls it with the loader: ``ResumableRandom()`` (no loader)
        is that factory; called, it returns the order bound to the loader."""

        def __init__(self, loader=None) -> None:
            self.epoch, self.skip = 0, 0
            if loader is not None:
                super().__init__(loader)

        def __call__(self, loader) -> "ResumableRandom":
            return type(self)(loader)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def sample_order(self, epoch: int):
            order = super().sample_order(epoch)
            if self.skip:  # drop_last's cut first (FFCV cuts after this), so the batches line up
                loader = self.loader
                whole = len(order) - (len(order) % loader.batch_size if loader.drop_last else 0)
                order = order[:whole][self.skip:]
            return order

    return ResumableRandom


class ResumableFFCVLoader:
    """An FFCV training ``Loader`` (with a ``ResumableRandom`` order) that Lightning can save and
    resume: ``state_dict`` / ``load_state_dict`` hold the epoch and the examples yielded in it
    (per rank: under DDP every rank has yielded as many, and each skips that many of its own
    shard). ``sampler`` is the order, whose ``set_epoch`` Lightning calls at every epoch's start;
    ``len`` is the whole epoch's batch count, as Lightning counts a resumed epoch's batches from
    the saved position."""

    def __init__(self, loader) -> None:
        self.loader, self.sampler = loader, loader.traversal_order
        self.batch_size = loader.batch_size
        # the examples of one epoch (this rank's): FFCV's order less drop_last's cut
        self.examples = min(len(loader.first_traversal_order), len(loader) * loader.batch_size)
        self._position = (0, 0)  # (epoch, examples yielded in it)
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # a generator: FFCV draws the order at the first batch, after Lightning's set_epoch
        # (Lightning calls iter() before it); a saved position applies only to its own epoch
        resume, self._resume = self._resume, None
        order, epoch = self.sampler, self.sampler.epoch
        yielded = resume["yielded"] if resume and resume["epoch"] == epoch else 0
        self._position = (epoch, yielded)
        if yielded >= self.examples:
            return  # saved at the epoch's end: nothing is left of it
        self.loader.next_epoch, order.skip = epoch, yielded  # FFCV counts epochs from 0 per Loader
        try:
            batches = iter(self.loader)  # FFCV calls order.sample_order(epoch) here
        finally:
            order.skip = 0
        try:
            for batch in batches:
                yielded += len(batch[0])
                self._position = (epoch, yielded)
                yield batch
        finally:  # an epoch left early (a stop, limit_train_batches) ends FFCV's reading thread
            batches.close()

    def state_dict(self) -> dict[str, int]:
        epoch, yielded = self._position
        return {"sampler": "EpochShuffle", "epoch": self.sampler.epoch,
                "yielded": yielded if epoch == self.sampler.epoch else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._position, self._resume = (state["epoch"], state["yielded"]), dict(state)


# -- ImageFolder trees -----------------------------------------------------------------------------
# torchvision's ImageFolder walks with os.walk(followlinks=True), so a symlink loop inside a class
# folder repeats its images once per level until the OS refuses the path (one ``ln -s . loop``
# counts 6 images as 126), and it takes a hidden folder (``.cache/``, ``.ipynb_checkpoints/``) for
# a class, shifting the labels of the real ones. Here:
# - names starting with "." are ignored, as classes, folders and images (as every image tool does);
# - symlinks are followed (a class folder or a part of it may live on another disk), but not into a
#   loop: a link to a folder that holds the one the link is in (``ln -s .. up``) or to a folder
#   already read for this class (``ln -s . again``, a second link to one folder) is skipped, so
#   every image counts once and a class never takes in its siblings through a link to its parent.

def find_classes(directory: str | Path) -> tuple[list[str], dict[str, int]]:
    """The class folders of an ImageFolder tree (sorted, hidden ones left out) and their labels;
    torchvision's ``find_classes`` less the hidden folders."""
    classes = sorted(entry.name for entry in os.scandir(directory)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {name: i for i, name in enumerate(classes)}


def check_class_folders(split_path: Path, split: str,
                        like: tuple[Path, list[str]] | None = None) -> list[str]:
    """The class folders of one split, each holding at least one image; ``like``: (the training
    split, its classes), which this split's class folders must equal (labels are folder ranks)."""
    try:
        classes = find_classes(split_path)[0]
    except FileNotFoundError:
        raise DataError(f"the {split} split {split_path} holds no class folder (expected "
                        f"{split_path}/CLASS/IMAGE)") from None
    if like is not None and classes != like[1]:
        extra, missing = sorted(set(classes) - set(like[1])), sorted(set(like[1]) - set(classes))
        differ = [f"{len(extra)} not in {like[0]} ({', '.join(extra[:5])})"] if extra else []
        differ += [f"{len(missing)} of {like[0]} missing ({', '.join(missing[:5])})"] if missing else []
        raise DataError(f"the {split} split {split_path} has other class folders than {like[0]}: "
                        f"{'; '.join(differ) or 'the same names, another order'} (its labels "
                        "would not match)")
    empty = [name for name in classes if next(_images(split_path / name), None) is None]
    if empty:
        raise DataError(f"the {split} split {split_path} has {len(empty)} class folder(s) without "
                        f"an image: {', '.join(str(split_path / n) for n in empty[:5])} (images: "
                        f"{', '.join(IMG_EXTENSIONS)})")
    return classes


def image_files(folder: str | Path, is_valid_file=None) -> list[str]:
    """The images under ``folder``, recursively, in torchvision's order (by folder, then name):
    hidden names left out, symlinks followed but not into a loop (see above)."""
    found = [(root, sorted(paths)) for root, paths in _image_walk(folder, is_valid_file)]
    return [path for _, paths in sorted(found) for path in paths]


def _images(folder: Path):
    """The images under ``folder`` in no particular order, read lazily (the first is enough to
    know a class folder is not empty)."""
    return (path for _, paths in _image_walk(folder) for path in paths)


def _image_walk(folder: str | Path, is_valid_file=None):
    """(folder, its image paths) for every folder under ``folder``: hidden names left out,
    symlinks followed but not into a loop."""
    valid = is_valid_file or (lambda path: has_file_allowed_extension(path, IMG_EXTENSIONS))
    seen = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        here, keep = os.path.realpath(root), []
        for name in dirs:
            real = os.path.realpath(os.path.join(root, name))
            loop = real in seen or here.startswith(real.rstrip(os.sep) + os.sep)
            if not name.startswith(".") and not loop:
                seen.add(real)
                keep.append(name)
        dirs[:] = keep  # os.walk descends only into these
        paths = (os.path.join(root, name) for name in files if not name.startswith("."))
        yield root, [path for path in paths if valid(path)]


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with the scan above, through its ``find_classes`` and
    ``make_dataset`` hooks (same arguments, same order of samples on a plain tree)."""

    def find_classes(self, directory):
        return find_classes(directory)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        if extensions is not None:
            is_valid_file = lambda path: has_file_allowed_extension(path, extensions)  # noqa: E731
        samples, empty = [], []
        for name, label in sorted(class_to_idx.items()):
            files = image_files(os.path.join(directory, name), is_valid_file)
            samples += [(path, label) for path in files]
            empty += [] if files else [name]
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)} in "
                                    f"{directory}.")
        return samples


def _decode(path: str):
    """ImageFolder's image loader, failing with the file's name (a DataLoader worker passes the
    message on; ``DataError`` puts it on the first line)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as err:  # noqa: BLE001 - PIL reports bad files as assorted errors
        raise DataError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def _beton_labels(path: Path):
    """The labels stored in a .beton file's metadata (no image is decoded)."""
    try:
        from ffcv.reader import Reader
    except Exception as err:  # noqa: BLE001 - ImportError, or a missing system library
        raise DataError(f"cannot read {path}: FFCV is not installed ({type(err).__name__}: {err}); "
                        "install it with `pip install -e .[ffcv]` (needs apt-get install "
                        "libturbojpeg0-dev libopencv-dev), or use backend: folder") from err
    try:
        reader = Reader(str(path))
        return reader.metadata[f"f{reader.field_names.index('label')}"]
    except Exception as err:  # noqa: BLE001 - a corrupt header gives assorted low-level errors
        raise DataError(f"cannot read FFCV file {path}: {type(err).__name__}: {err}") from err

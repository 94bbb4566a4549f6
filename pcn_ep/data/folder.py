"""Your own images: an ImageFolder tree under one root, read like ImageNet's folder backend."""
from __future__ import annotations

import os
from pathlib import Path

from .base import DataError
from .imagenet import ImageNetDataModule, find_classes, image_files


class ImageFolderDataModule(ImageNetDataModule):
    """Images in torchvision's ImageFolder layout: ``root/train/CLASS/IMAGE``, ``root/val/CLASS/IMAGE``
    and optionally ``root/test/CLASS/IMAGE`` (without it, ``test`` evaluates ``val``). Any format
    Pillow reads, of any size: training takes random crops, evaluation resizes and center-crops.
    Hidden names (starting with ".") are ignored; symlinks are followed, each real folder read once
    per class (a loop is not followed again; see ``imagenet.image_files``).

    What the data decides, read from the folders when the module is built (so that the CLI's
    ``network_from_data`` can size the network before training): ``num_classes`` (the class
    folders of ``train/``) and the channels (1 if the first training image is grayscale, else 3).
    Normalized with ImageNet's statistics (their mean for grayscale).

    Args:
        root: the folder that holds ``train/`` and ``val/`` (and optionally ``test/``).
        image_size: side of the square crop the network sees.
        val_resize: evaluation resizes the short side to this, then center-crops ``image_size``;
            null: ``image_size`` × 8/7.
        channels: 1 (grayscale) or 3 (RGB); null: from the first training image.
        train_crop: ``random_resized`` (a random area and aspect ratio, resized) or ``random`` (resize
            to ``val_resize``, then a random ``image_size`` crop); both add a horizontal flip.
        min_scale: the smallest area fraction a ``random_resized`` crop covers.
        batch_size: per process.
        num_workers: decoding workers per process; null: 4, or fewer if the process has fewer CPUs.
        drop_last: drop the last incomplete training batch.
        seed: seeds the training order, each example's augmentation (a function of seed, epoch and
            example, so that a resumed run continues bitwise) and the device-side random crops.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        val_resize: int | None = None,
        channels: int | None = None,
        train_crop: str = "random_resized",
        min_scale: float = 0.35,
        batch_size: int = 64,
        num_workers: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"data root not found: {folder} (check data.init_args.root)")
        splits = {name: folder / name for name in ("train", "val", "test")}
        if not (splits["train"].is_dir() and splits["val"].is_dir()):
            raise DataError(f"{folder} must hold train/ and val/ folders with one folder of images "
                            "per class inside each (ROOT/train/CLASS/IMAGE, ROOT/val/CLASS/IMAGE)")
        try:
            classes = find_classes(str(splits["train"]))[0]
        except FileNotFoundError as err:
            raise DataError(f"{splits['train']}: {err} (expected one folder per class)") from None
        if num_workers is None:
            num_workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1)
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null, got {channels!r}")
        super().__init__(str(splits["train"]), str(splits["val"]), backend="folder",
                         num_classes=len(classes), image_size=image_size, val_resize=val_resize,
                         train_crop=train_crop, min_scale=min_scale, batch_size=batch_size,
                         num_workers=num_workers, drop_last=drop_last, seed=seed)
        self.root = folder
        self.test_path = splits["test"] if splits["test"].is_dir() else splits["val"]
        self.channels = channels or _channels(splits["train"], classes[0])

def _channels(train: Path, first_class: str) -> int:
    """1 if the first image of the first class is grayscale (Pillow modes 1, L, I, F), else 3."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    images = image_files(train / first_class)  # in the order of the data set's samples
    if not images:
        raise DataError(f"{train / first_class} holds no image ({', '.join(IMG_EXTENSIONS)})")
    try:
        with Image.open(images[0]) as image:
            mode = image.mode
    except OSError as err:
        raise DataError(f"cannot decode image {images[0]}: {err}") from None
    return 1 if mode.split(";")[0] in ("1", "L", "LA", "I", "F") else 3

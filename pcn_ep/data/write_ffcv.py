"""``python -m pcn_ep write-ffcv --src DIR --out FILE.beton``: an ImageFolder tree to an FFCV dataset.

ImageNet's ``train/`` and ``val/`` layouts (one folder per class) are ImageFolder trees. The file is
written under a temporary name next to the output and renamed when complete, so an interrupted run
never leaves a half-written file under the final name; an existing output is kept unless
``--overwrite``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..commandline import CommandParser
from .base import DataError
from .imagenet import ImageFolder


def write_ffcv(src: str | Path, out: str | Path, max_resolution: int = 512, jpeg_quality: int = 90,
               write_mode: str = "smart", compress_probability: float = 0.5, workers: int = 8,
               overwrite: bool = False, page_size: int = 1 << 21) -> dict:
    """Write ``src`` (an ImageFolder tree) to ``out``; returns image and class counts.

    ``page_size`` 2 MiB (FFCV's default is 8 MiB) keeps small test files small; ImageNet writers may
    pass larger pages.
    """
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except Exception as err:  # noqa: BLE001 - ImportError, or a missing system library
        raise DataError(f"write-ffcv needs FFCV, which is not installed ({type(err).__name__}: "
                        f"{err}); install it with `pip install -e .[ffcv]` (needs apt-get install "
                        "libturbojpeg0-dev libopencv-dev)") from err

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    dataset = ImageFolder(str(src))  # raises FileNotFoundError naming src when it has no classes
    # (pcn_ep's ImageFolder: hidden names ignored, symlink loops not followed)
    if len(dataset) == 0:
        raise FileNotFoundError(f"no images found under {src}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    errors = partial.with_name(partial.name + ".errors")
    dataset = _Reporting(dataset, errors)
    writer = DatasetWriter(str(partial), {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality, compress_probability=compress_probability),
        "label": IntField(),
    }, num_workers=workers, page_size=page_size)
    try:
        writer.from_indexed_dataset(dataset)
        if errors.exists():
            raise ValueError(f"unreadable images under {src}: " + "; ".join(
                errors.read_text().splitlines()[:5]))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        errors.unlink(missing_ok=True)
    return {"images": len(dataset), "classes": len(dataset.inner.classes), "out": str(out)}


class _Reporting:
    """Wraps the ImageFolder: an unreadable image is noted in a side file and replaced by a black
    pixel, instead of killing an FFCV writer process (which leaves FFCV waiting forever)."""

    def __init__(self, inner, errors: Path) -> None:
        self.inner, self.errors = inner, errors

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        try:
            return self.inner[index]
        except Exception as err:  # noqa: BLE001 - any decoding failure of any file
            with open(self.errors, "a") as f:
                f.write(f"{self.inner.samples[index][0]}: {type(err).__name__}\n")
            from PIL import Image

            return Image.new("RGB", (1, 1)), self.inner.samples[index][1]


def parser() -> CommandParser:
    p = CommandParser(prog="python -m pcn_ep write-ffcv", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="ImageFolder root (one sub-folder per class)")
    p.add_argument("--out", required=True, help="the .beton file to write")
    p.add_argument("--max-resolution", type=int, default=512,
                   help="longer side is resized down to this (FFCV ImageNet recipe: 256-512)")
    p.add_argument("--jpeg-quality", type=int, default=90,
                   help="JPEG quality (1-100) of the images stored as JPEG")
    p.add_argument("--write-mode", choices=["raw", "jpg", "smart", "proportion"], default="smart",
                   help="FFCV's image storage: raw pixels, JPEG, smart (JPEG for the large "
                        "images) or proportion (a share of them as JPEG)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of images stored as JPEG with --write-mode proportion")
    p.add_argument("--workers", type=int, default=8, help="processes that encode the images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = write_ffcv(args.src, args.out, args.max_resolution, args.jpeg_quality,
                            args.write_mode, args.compress_probability, args.workers,
                            args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        print(f"pcn_ep: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {report['images']} images of {report['classes']} classes to {report['out']}")
    return 0

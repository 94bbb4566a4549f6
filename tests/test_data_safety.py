"""Data files cannot run code, ImageFolder trees count what is there, write-ffcv fails in one line.

- CIFAR / ImageNet32 pickles go through an unpickler that allows only the globals of arrays, lists,
  strings and numbers: a crafted batch is refused naming the file, and its payload never runs;
- ImageFolder: hidden names are ignored, symlink loops are not followed;
- ``write-ffcv`` without FFCV is one ``pcn_ep: error:`` line.
"""
import contextlib
import os
import pickle
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from images import cifar, image_folder, imagenet32
from pcn_ep.data import DataError, ImageDataModule, ImageFolderDataModule, ImageNetDataModule
from pcn_ep.data.imagenet import ImageFolder


# -- pickles ------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker's ``data_batch_1`` would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _batch(path):
    with open(path, "rb") as f:
        return pickle.load(f)  # our own test file


def _dump(path, obj, protocol):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("where", ["whole file", "in the labels", "in an object array"])
def test_malicious_cifar_batch_is_refused_and_never_runs(tmp_path, protocol, where):
    path = cifar(tmp_path, 10) / "cifar-10-batches-py" / "data_batch_1"
    marker = tmp_path / "pwned"
    evil = _Payload(marker)
    payload = {"whole file": evil, "in the labels": {**_batch(path), "labels": [0, evil]},
               "in an object array": {**_batch(path), "labels": np.array([0, evil], object)}}[where]
    _dump(path, payload, protocol)
    pickle.loads(path.read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError) as err:
        ImageDataModule("cifar10", str(tmp_path)).setup()
    assert str(err.value) == (f"{path}: refused to load: the pickle asks for {os.system.__module__}"
                              ".system; CIFAR/ImageNet32 files hold only arrays, lists and numbers")
    assert not marker.exists()


def test_malicious_imagenet32_and_cifar100_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for dataset, root, path in (("imagenet32", tmp_path / "i32", "val_data"),
                                ("cifar100", tmp_path / "c100", "cifar-100-python/test")):
        (imagenet32 if dataset == "imagenet32" else lambda r: cifar(r, 100))(root)
        path = root / path
        _dump(path, {**_batch(path), "data": _Payload(marker)}, 2)
        with pytest.raises(DataError, match=f"^{path}: refused to load: .*system"):
            ImageDataModule(dataset, str(root)).setup()
    assert not marker.exists()


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the official CIFAR archives hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2(obj) -> bytes:
    """A pickle as Python 2 with numpy 1.x wrote it: str keys and values, numpy.core globals."""
    import io

    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    assert b"cnumpy._core.multiarray\n_reconstruct" in f.getvalue()
    return f.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


@pytest.mark.parametrize("write", [
    lambda b, p: pickle.dumps(b, protocol=2),
    lambda b, p: pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL),
    lambda b, p: pickle.dumps({**b, "labels": np.array(b["labels"])}, protocol=2),
    lambda b, p: pickle.dumps({**b, "labels": [np.int64(v) for v in b["labels"]],
                               "mean": b["data"].mean(0)}, protocol=5),
    lambda b, p: pickle.dumps({**b, "batch_label": b"training batch", "coarse": (1, 2.5)}, 0),
    lambda b, p: _py2({b"data": b["data"], b"labels": b["labels"], b"batch_label": b"batch 1",
                       b"filenames": [b"a.png"] * len(b["labels"])}),
], ids=["protocol 2", "highest protocol", "numpy labels", "numpy scalars, protocol 5",
        "protocol 0 with bytes", "python 2 with numpy 1.x"])
def test_valid_cifar_batches_still_load(tmp_path, write):
    folder = cifar(tmp_path, 10) / "cifar-10-batches-py"
    expected = ImageDataModule("cifar10", str(tmp_path))
    expected.setup()
    for path in folder.iterdir():
        path.write_bytes(write(_batch(path), path))
    dm = ImageDataModule("cifar10", str(tmp_path))
    dm.setup()
    for split in ("train", "test"):
        assert all(torch.equal(a, b) for a, b in zip(dm.splits[split], expected.splits[split]))
    assert dm.splits["train"][0].shape == (10, 3, 32, 32)


# -- ImageFolder trees --------------------------------------------------------------------------
def _copy_image(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())


@contextlib.contextmanager
def _within(seconds):
    """Fails instead of hanging: torchvision's walk through several loops never ends."""
    def stop(*_):
        raise TimeoutError(f"scanning the folder took over {seconds} s (following a loop?)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_one_symlink_loop_counts_6_images_as_6(tmp_path):
    root = image_folder(tmp_path / "train", classes=2, per_class=3)
    os.symlink(".", root / "class_000" / "loop")  # torchvision: 6 images counted as 126
    with _within(30):
        assert ImageFolder(str(root)).targets == [0, 0, 0, 1, 1, 1]


def test_symlink_loops_in_a_class_count_each_image_once(tmp_path):
    root = image_folder(tmp_path / "train", classes=2, per_class=3)
    clean = ImageFolder(str(root))
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    assert clean.samples == TorchvisionImageFolder(str(root)).samples  # same order on a plain tree
    (root / "class_000" / "sub").mkdir()
    os.symlink("..", root / "class_000" / "up")  # to the root: the class would take in its sibling
    os.symlink(".", root / "class_000" / "self")
    os.symlink("../..", root / "class_000" / "sub" / "back")
    os.symlink(root / "class_001", root / "class_001" / "again")
    os.symlink(root / "class_000" / "sub", root / "class_000" / "twice")  # a second link to sub
    with _within(30):
        dataset = ImageFolder(str(root))
    assert len(dataset) == 6 and dataset.samples == clean.samples
    # A real folder behind a link (data on another disk) is still read, once.
    _copy_image(root / "class_000" / "img_0000.png", tmp_path / "elsewhere" / "extra.png")
    os.symlink(tmp_path / "elsewhere", root / "class_001" / "linked")
    os.symlink(tmp_path / "elsewhere", root / "class_001" / "linked_again")
    assert ImageFolder(str(root)).targets == [0, 0, 0, 1, 1, 1, 1]


def test_symlink_loop_through_the_data_modules(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        image_folder(root / split, classes=2, per_class=3)
        os.symlink("..", root / split / "class_001" / "loop")
    with _within(30):
        dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0)
        dm.setup()
        assert dm.num_classes == 2 and len(dm.val_dataloader().dataset) == 6
        dm = ImageNetDataModule(str(root / "train"), str(root / "val"), backend="folder",
                                num_classes=2, image_size=16, val_resize=18, num_workers=0)
        dm.setup()
        assert len(dm.train_dataloader().dataset) == 6


def test_hidden_folders_and_files_are_ignored(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        image_folder(root / split, classes=2, per_class=2)
    expected = ImageFolder(str(root / "val")).targets
    png = root / "train" / "class_000" / "img_0000.png"
    for split in ("train", "val"):
        _copy_image(png, root / split / ".hidden" / "img.png")  # would be class 0 and shift 0, 1
        _copy_image(png, root / split / "class_001" / ".cache" / "img.png")
        (root / split / "class_000" / "._img_0000.png").write_bytes(b"macOS resource fork")
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=8, num_workers=0)
    dm.setup()
    assert dm.num_classes == 2
    dataset = dm.val_dataloader().dataset
    assert dataset.classes == ["class_000", "class_001"] and dataset.targets == expected
    _, labels = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert labels.tolist() == expected  # every image decodes (the ._ file is not read)
    ImageNetDataModule(str(root / "train"), str(root / "val"), backend="folder", num_classes=2,
                       image_size=16, val_resize=18).setup()


def test_a_tree_of_only_hidden_folders_has_no_class(tmp_path):
    _copy_image(image_folder(tmp_path / "src", 1, 1) / "class_000" / "img_0000.png",
                tmp_path / "root" / "train" / ".hidden" / "a.png")
    (tmp_path / "root" / "val").mkdir()
    with pytest.raises(DataError, match=r"train: Couldn't find any class folder"):
        ImageFolderDataModule(str(tmp_path / "root"))


# -- write-ffcv ---------------------------------------------------------------------------------
def test_write_ffcv_without_ffcv_is_one_line(tmp_path):
    src = image_folder(tmp_path / "src", classes=2, per_class=1)
    out = tmp_path / "out.beton"
    code = ("import sys; sys.modules['ffcv'] = None; from pcn_ep.__main__ import main; "
            f"sys.exit(main(['write-ffcv', '--src', {str(src)!r}, '--out', {str(out)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("pcn_ep: error: write-ffcv needs FFCV, which is not installed")
    assert "pip install -e .[ffcv]" in run.stderr and not out.exists()

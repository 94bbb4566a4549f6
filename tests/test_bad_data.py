"""Bad data ends in one DataError whose first line names the file (or split) and the problem."""
import gzip
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from images import cifar, image_folder, imagenet32, mnist
from pcn_ep.data import (DataError, DigitsDataModule, ImageDataModule, ImageNetDataModule,
                         SparseParityDataModule, TensorDataModule)


def _idx(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    return (bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
            + array.tobytes())


def _fails(dataset, root, match):
    with pytest.raises(DataError, match=match) as err:
        ImageDataModule(dataset, str(root)).setup()
    return str(err.value)


# -- MNIST idx files ----------------------------------------------------------------------------
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz"


def _swap(raw):
    images, labels = (raw / IMAGES).read_bytes(), gzip.decompress((raw / LABELS).read_bytes())
    (raw / IMAGES).write_bytes(labels)
    (raw / LABELS).write_bytes(gzip.compress(images))


def _folder(raw):
    (raw / IMAGES).unlink()
    (raw / IMAGES).mkdir()


@pytest.mark.parametrize("damage, file, problem", [
    (lambda raw: (raw / IMAGES).write_bytes(b"\x00\x00"), IMAGES, "2 bytes, too short"),
    (lambda raw: (raw / IMAGES).write_bytes(b""), IMAGES, "empty file"),
    (_swap, IMAGES, r"1-D array, expected 3-D images .*swapped"),
    (lambda raw: (raw / LABELS).write_bytes(b"\x1f\x8b\x08garbage"), LABELS, "corrupt gzip"),
    (lambda raw: (raw / LABELS).write_bytes(b"not gzip at all"), LABELS, "corrupt gzip"),
    (lambda raw: (raw / IMAGES).write_bytes(b"\x08\x03" + (raw / IMAGES).read_bytes()[2:]),
     IMAGES, "bad magic number 0x0803"),
    (lambda raw: (raw / LABELS).write_bytes(gzip.compress(_idx(np.zeros((10, 2))))), LABELS,
     "2-D array, expected 1-D labels"),
    (_folder, IMAGES, "is a folder, expected a data file"),
    (lambda raw: (raw / LABELS).write_bytes(gzip.compress(_idx(np.arange(9) % 10))), LABELS,
     "10 images but .* holds 9 labels"),
    (lambda raw: (raw / IMAGES).write_bytes((raw / IMAGES).read_bytes()[:-5]), IMAGES,
     "truncated or corrupt"),
    (lambda raw: (raw / IMAGES).write_bytes((raw / IMAGES).read_bytes()[:10]), IMAGES,
     "truncated or corrupt"),  # inside the header
])
def test_bad_mnist_files_name_the_file(tmp_path, damage, file, problem):
    damage(mnist(tmp_path) / "MNIST" / "raw")
    message = _fails("mnist", tmp_path, problem)
    assert file in message.splitlines()[0]


def test_mnist_labels_out_of_range_name_the_split_and_file(tmp_path):
    raw = mnist(tmp_path) / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx([1, 2, 12, 3, 4])))
    _fails("mnist", tmp_path, r"test split of .*t10k-labels-idx1-ubyte.gz: label 12 of example 2 "
                              r"is outside 0\.\.9")


# -- CIFAR and ImageNet32 pickles ---------------------------------------------------------------
def _rewrite(path, edit):
    with open(path, "rb") as f:
        obj = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump(edit(obj), f)


@pytest.mark.parametrize("edit, problem", [
    (lambda b: {**b, "data": b["data"][:, :1000]}, r"'data' must be N × 3072 uint8 .*\(6, 1000\)"),
    (lambda b: {**b, "data": b["data"].astype(float)}, "'data' must be N × 3072 uint8"),
    (lambda b: {"data": b["data"]}, r"'data' and 'labels' entries, found \['data'\]"),
    (lambda b: {**b, "labels": [str(v) for v in b["labels"]]}, "integer class indices"),
    (lambda b: [b["data"], b["labels"]], "found list"),
    (lambda b: {**b, "labels": b["labels"][:5]}, "6 images but 5 labels"),
    (lambda b: {**b, "labels": [[v] for v in b["labels"]]}, "integer class indices"),
])
def test_bad_cifar_pickles_name_the_file(tmp_path, edit, problem):
    _rewrite(cifar(tmp_path, 10) / "cifar-10-batches-py" / "test_batch", edit)
    assert "test_batch: " in _fails("cifar10", tmp_path, problem).splitlines()[0]


def test_cifar100_missing_fine_labels_and_unreadable_pickle(tmp_path):
    path = cifar(tmp_path, 100) / "cifar-100-python" / "train"
    _rewrite(path, lambda b: {"data": b["data"], "labels": b["fine_labels"]})
    _fails("cifar100", tmp_path, r"train: expected .*'fine_labels' entries, found \['data', 'labels'\]")
    path.write_bytes(b"\x80\x04\x95garbage")
    _fails("cifar100", tmp_path, "train: not a readable pickle")


def test_labels_out_of_range_in_any_split_name_split_and_file(tmp_path):
    folder = cifar(tmp_path, 10) / "cifar-10-batches-py"
    _rewrite(folder / "test_batch", lambda b: {**b, "labels": [0, 1, 2, 10, 4, 5]})
    _fails("cifar10", tmp_path, r"test split of .*test_batch: label 10 of example 3 is outside "
                                r"0\.\.9 \(1 such labels\)")
    _rewrite(folder / "test_batch", lambda b: {**b, "labels": [0, 1, 2, 3, 4, 5]})
    _rewrite(folder / "data_batch_4", lambda b: {**b, "labels": [-1, 1]})
    with pytest.raises(DataError, match=r"(train|val) split of .*data_batch_1,.*: label -1"):
        ImageDataModule("cifar10", str(tmp_path), val_size=6).setup()
    with pytest.raises(DataError, match="val_size 10 must be between 0 and the 10 training"):
        ImageDataModule("cifar10", str(tmp_path), val_size=10).setup()


def test_imagenet32_label_zero_is_out_of_range_of_one_based_labels(tmp_path):
    imagenet32(tmp_path)
    _rewrite(tmp_path / "val_data", lambda b: {**b, "labels": [1, 0, 3, 4]})
    _fails("imagenet32", tmp_path, r"test split of .*val_data \(labels 1-based on disk.*: label -1 "
                                   "of example 1")


# -- the generic per-split check ----------------------------------------------------------------
class _Tensors(TensorDataModule):
    num_classes = 3

    def __init__(self, split, x_fix=None, y_fix=None):
        super().__init__(batch_size=4)
        self.split, self.x_fix, self.y_fix = split, x_fix, y_fix

    def setup(self, stage=None):
        splits = {s: (torch.zeros(6, 2), torch.arange(6) % 3) for s in ("train", "val", "test")}
        x, y = splits[self.split]
        splits[self.split] = (self.x_fix(x.clone()) if self.x_fix else x,
                              self.y_fix(y.clone()) if self.y_fix else y)
        self.set_splits(splits, "my-data.npz")


def _nan(x):
    x[4, 1] = float("nan")
    return x


def _inf(x):
    x[2, 0] = -float("inf")
    return x


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("x_fix, y_fix, problem", [
    (_nan, None, "example 4 has non-finite values"),
    (_inf, None, "example 2 has non-finite values"),
    (None, lambda y: y - 1, r"label -1 of example 0 is outside 0\.\.2 \(2 such labels\)"),
    (None, lambda y: y + 1, r"label 3 of example 2 is outside 0\.\.2"),
    (None, lambda y: y.float(), "labels must be integer class indices, got torch.float32"),
    (None, lambda y: y[:5], r"6 inputs and labels of shape \(5,\)"),
])
def test_every_split_is_checked_once_at_setup(split, x_fix, y_fix, problem):
    with pytest.raises(DataError, match=f"^{split} split of my-data.npz: {problem}"):
        _Tensors(split, x_fix, y_fix).setup()


# -- ImageNet: ImageFolder and FFCV -------------------------------------------------------------
def _imagenet(train, val=None, backend="folder", **kw):
    return ImageNetDataModule(str(train), str(val or train), backend=backend,
                              num_classes=kw.pop("num_classes", 2), image_size=32, val_resize=36,
                              batch_size=4, **kw)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_jpeg_in_image_folder_names_the_file(tmp_path, workers):
    folder = image_folder(tmp_path / "train", classes=2, per_class=3)
    jpeg = folder / "class_001" / "img_0001.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # a truncated download
    dm = _imagenet(folder, num_workers=workers)
    dm.setup()
    with pytest.raises(DataError) as err:
        list(dm.val_dataloader())
    assert str(err.value).splitlines()[0].startswith(f"cannot decode image {jpeg}: ")


def test_missing_path_names_the_config_key(tmp_path):
    folder = image_folder(tmp_path / "train", classes=2, per_class=1)
    with pytest.raises(FileNotFoundError, match=r"nope.beton \(check data.init_args.train_path\)"):
        _imagenet(tmp_path / "nope.beton", folder, backend="ffcv").setup()
    with pytest.raises(FileNotFoundError, match=r"nope \(check data.init_args.val_path\)"):
        _imagenet(folder, tmp_path / "nope").setup()


def test_folder_given_to_ffcv_backend_and_val_classes_differ(tmp_path):
    folder = image_folder(tmp_path / "train", classes=2, per_class=1)
    with pytest.raises(DataError, match="train is a folder but backend is 'ffcv'"):
        _imagenet(folder, backend="ffcv").setup()
    val = image_folder(tmp_path / "val", classes=3, per_class=1)
    with pytest.raises(DataError, match=r"the val split .*val has other class folders than "
                       r".*train: 1 not in .*train \(class_002\)"):
        _imagenet(folder, val).setup()


def test_beton_without_ffcv_says_how_to_install(tmp_path, monkeypatch):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"\0" * 64)
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")] + ["ffcv"]:
        monkeypatch.setitem(sys.modules, name, None)  # import ffcv now raises ImportError
    with pytest.raises(DataError, match=r"cannot read .*train.beton: FFCV is not installed .*"
                                        r"pip install -e \.\[ffcv\]. \(needs apt-get install "
                                        "libturbojpeg0-dev libopencv-dev"):
        _imagenet(beton, backend="ffcv").setup()


def test_beton_labels_out_of_range(tmp_path):
    pytest.importorskip("ffcv")
    from pcn_ep.data.write_ffcv import write_ffcv

    write_ffcv(image_folder(tmp_path / "train", classes=3, per_class=1), tmp_path / "t.beton",
               max_resolution=32, workers=1)
    with pytest.raises(DataError, match=r"t.beton: label 2 is outside 0\.\.1 \(1 such labels\)"):
        _imagenet(tmp_path / "t.beton", backend="ffcv").setup()


# -- what a model can ask of any data module ----------------------------------------------------
@pytest.mark.parametrize("make, classes, shape", [
    (lambda tmp: DigitsDataModule(image_size=16), 10, (1, 16, 16)),
    (lambda tmp: SparseParityDataModule(n_bits=12), 2, (12,)),
    (lambda tmp: ImageDataModule("mnist", str(mnist(tmp)), val_size=3, batch_size=4), 10,
     (1, 32, 32)),
    (lambda tmp: ImageDataModule("cifar100", str(cifar(tmp, 100)), batch_size=4), 100, (3, 32, 32)),
    (lambda tmp: _imagenet(image_folder(tmp / "t", 2, 2), num_workers=0), 2, (3, 32, 32)),
])
def test_example_shape_and_num_classes_match_the_batches(tmp_path, make, classes, shape):
    dm = make(tmp_path)
    dm.setup()
    assert dm.num_classes == classes and dm.example_shape() == shape
    x, y = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert tuple(x.shape[1:]) == shape and y.max() < classes


def test_worker_message_puts_the_original_first():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
               "call last):\n  File \"x.py\", line 1\npcn_ep.data.base.DataError: cannot decode "
               "image a.jpg: OSError: truncated\n")
    assert str(DataError(wrapped)).splitlines()[:2] == [
        "cannot decode image a.jpg: OSError: truncated", "Caught DataError in DataLoader worker "
        "process 0."]
    assert str(DataError("plain")) == "plain"


def _folder_run(tmp_path, capsys, damage):
    """configs/imagefolder.yaml on a 2-class tree damaged by ``damage(root)``: the command's exit
    code, its one ``pcn_ep:`` line, and whether anything started (a W&B run, the model summary)."""
    import shutil

    import yaml

    from pcn_ep.training.cli import main

    root = tmp_path / "images"
    for split in ("train", "val"):
        image_folder(root / split, classes=2, per_class=2)
    damage(root)
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "imagefolder.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_epochs=1, accelerator="cpu")
    cfg["data"]["init_args"].update(root=str(root), image_size=16, num_workers=0, batch_size=2)
    cfg["model"]["network"]["init_args"]["width_mult"] = 0.0625
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code = main(["fit", "--config", str(config)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("pcn_ep:")]
    started = (tmp_path / "run" / "wandb").exists() or "Params" in captured.out + captured.err
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    return code, lines, started, captured.out


@pytest.mark.parametrize("damage, says", [
    (lambda root: [p.unlink() for p in (root / "train" / "class_001").iterdir()],
     r"the train split .*/train has 1 class folder\(s\) without an image: .*/train/class_001 "),
    (lambda root: [p.unlink() for p in (root / "val" / "class_000").iterdir()],
     r"the val split .*/val has 1 class folder\(s\) without an image: .*/val/class_000 "),
    (lambda root: (root / "val" / "extra").mkdir(),
     r"the val split .*/val has other class folders than .*/train: 1 not in .*/train \(extra\)"),
    (lambda root: [p.unlink() for p in (root / "val").rglob("*.*")],
     r"the val split .*/val has 2 class folder\(s\) without an image"),   # a split with no image
])
def test_a_bad_image_folder_tree_fails_before_anything_starts(tmp_path, capsys, damage, says):
    """Found at setup, before the model summary, with no W&B run (the finding: an empty class
    folder failed after the sanity check, in torchvision's words, and left a failed W&B run)."""
    code, lines, started, _ = _folder_run(tmp_path, capsys, damage)
    assert not started, lines
    assert code == 1 and len(lines) == 1, lines
    assert re.match(f"pcn_ep: error: {says}", lines[0]), lines[0]


def test_a_tree_without_test_split_says_its_test_error_is_the_validation_error(tmp_path, capsys):
    """Without ROOT/test/, ``test`` evaluates val/, which also chose the best checkpoint: the
    summary says so (the finding: "test error: top1 16.67%" for the validation set)."""
    code, lines, _, out = _folder_run(tmp_path, capsys, lambda root: None)
    assert code == 0 and not lines, lines
    summary = out[out.index("pcn_ep: done."):]
    assert "  device: cpu\n" in summary
    assert re.search(r"test error: top1 [\d.]+%, which is the validation split", summary)  # 2 classes: no top-5

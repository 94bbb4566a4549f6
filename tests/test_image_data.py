"""Image data: write-ffcv, the FFCV and ImageFolder backends, the in-memory data sets' formats."""
import gc

import pytest
import torch

from images import cifar, image_folder, imagenet32, mnist
from pcn_ep.data import ImageDataModule, ImageNetDataModule
from pcn_ep.data.write_ffcv import main as write_ffcv_cli
from pcn_ep.data.write_ffcv import write_ffcv


@pytest.fixture(autouse=True)
def collect_dead_ffcv_loaders():
    """FFCV loaders collected later, in the middle of pytest parsing another file, make numba's
    finalizer raise a harmless KeyError that pytest then fails to format (SystemError: AST
    constructor recursion depth mismatch): collect them while this test's module is current."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def folder_and_beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    image_folder(root / "train", classes=4, per_class=5)
    write_ffcv(root / "train", root / "train.beton", max_resolution=64, workers=1)
    return root / "train", root / "train.beton"


def _module(path, backend, **kw):
    dm = ImageNetDataModule(str(path), str(path), backend=backend, num_classes=4, image_size=32,
                            val_resize=36, batch_size=5, num_workers=1, **kw)
    dm.setup()
    return dm


def _all(loader, dm):
    xs, ys = zip(*(dm.on_after_batch_transfer(b, 0) for b in loader))
    return torch.cat(xs), torch.cat(ys)


def test_write_ffcv_keeps_every_image_and_label(folder_and_beton):
    from torchvision.datasets import ImageFolder

    folder, beton = folder_and_beton
    _, labels = _all(_module(beton, "ffcv").val_dataloader(), _module(beton, "ffcv"))
    assert labels.tolist() == ImageFolder(str(folder)).targets  # 20 images, 4 classes, in order


def test_ffcv_and_folder_backends_agree(folder_and_beton):
    folder, beton = folder_and_beton
    xf, yf = _all(_module(beton, "ffcv").val_dataloader(), _module(beton, "ffcv"))
    xi, yi = _all(_module(folder, "folder").val_dataloader(), _module(folder, "folder"))
    assert xf.shape == xi.shape == (20, 3, 32, 32) and xf.dtype == xi.dtype == torch.float32
    assert torch.equal(yf, yi)
    # Same normalization (Table 4 statistics); the two resize kernels differ only slightly.
    assert abs(xf.mean() - xi.mean()) < 0.05 and abs(xf.std() - xi.std()) < 0.05
    assert torch.corrcoef(torch.stack([xf.flatten(), xi.flatten()]))[0, 1] > 0.95
    for backend, path in (("ffcv", beton), ("folder", folder)):
        for crop in ("random_resized", "random"):
            dm = _module(path, backend, train_crop=crop)
            x, _ = next(iter(dm.train_dataloader()))
            assert x.dtype == torch.uint8 and x.shape[:2] == (5, 3)


def test_write_ffcv_refuses_to_overwrite_and_reports_counts(folder_and_beton, tmp_path, capsys):
    folder, beton = folder_and_beton
    before = beton.read_bytes()
    assert write_ffcv_cli(["--src", str(folder), "--out", str(beton), "--workers", "1"]) == 1
    assert "exists" in capsys.readouterr().err and beton.read_bytes() == before
    out = tmp_path / "copy.beton"
    assert write_ffcv_cli(["--src", str(folder), "--out", str(out), "--workers", "1",
                           "--max-resolution", "48"]) == 0
    assert "wrote 20 images of 4 classes" in capsys.readouterr().out


def test_write_ffcv_leaves_no_half_written_file(tmp_path, capsys):
    src = image_folder(tmp_path / "src", classes=2, per_class=2)
    (src / "class_000" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.beton"
    with pytest.raises(ValueError, match="broken.png"):
        write_ffcv(src, out, workers=1)
    assert list(tmp_path.glob("*.beton*")) == [] and list(tmp_path.glob(".out.beton*")) == []


def test_empty_image_folder_and_missing_root_fail_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert write_ffcv_cli(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o.beton")]) == 1
    assert "class" in capsys.readouterr().err.lower()
    assert write_ffcv_cli(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o.beton")]) == 1
    assert "nope" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope"):
        _module(tmp_path / "nope", "ffcv")


def test_corrupt_beton_fails_naming_the_file(folder_and_beton, tmp_path):
    _, beton = folder_and_beton
    bad = tmp_path / "truncated.beton"
    bad.write_bytes(beton.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.beton"):
        _module(bad, "ffcv").train_dataloader()


def test_folder_class_count_must_match(folder_and_beton):
    folder, _ = folder_and_beton
    with pytest.raises(ValueError, match="has 4 classes, num_classes is 10"):
        ImageNetDataModule(str(folder), str(folder), backend="folder", num_classes=10).setup()


@pytest.mark.parametrize("dataset, write, classes, shape", [
    ("cifar10", lambda r: cifar(r, 10), 10, (3, 32, 32)),
    ("cifar100", lambda r: cifar(r, 100), 100, (3, 32, 32)),
    ("mnist", mnist, 10, (1, 32, 32)),
    ("imagenet32", imagenet32, 1000, (3, 32, 32)),
])
def test_in_memory_datasets_read_their_real_format(tmp_path, dataset, write, classes, shape):
    write(tmp_path)
    dm = ImageDataModule(dataset, str(tmp_path), batch_size=4)
    dm.setup()
    x, y = dm.splits["train"]
    assert x.dtype == torch.uint8 and x.shape[1:] == shape and dm.num_classes == classes
    assert y.min() >= 0 and y.max() < classes
    if dataset == "imagenet32":
        assert y[:2].tolist() == [0, 999]  # 1-based labels on disk
    if dataset == "mnist":
        assert x[:, :, :2].eq(0).all()  # padded by 2 to 32×32
    xb, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert xb.dtype == torch.float32 and xb.shape[1:] == shape


def test_missing_or_corrupt_in_memory_data_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageDataModule("cifar10", str(tmp_path / "nowhere")).setup()
    cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="test_batch"):
        ImageDataModule("cifar10", str(tmp_path)).setup()

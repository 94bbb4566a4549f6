"""Real images for data tests, written in each data set's on-disk format (nothing downloaded)."""
import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images


def real_images(count: int, size: int = 40, seed: int = 0) -> np.ndarray:
    """``count`` RGB uint8 images: crops of scikit-learn's two bundled photos and its digits."""
    rng = np.random.RandomState(seed)
    photos = load_sample_images().images  # china.jpg, flower.jpg (427 × 640 × 3)
    digits = load_digits().images
    out = []
    for i in range(count):
        if i % 2:
            photo = photos[(i // 2) % 2]
            r, c = rng.randint(0, photo.shape[0] - size), rng.randint(0, photo.shape[1] - size)
            out.append(photo[r: r + size, c: c + size])
        else:
            d = (digits[i % len(digits)] * 15.9).astype(np.uint8)
            big = np.asarray(Image.fromarray(d).resize((size, size)))
            out.append(np.stack([big] * 3, -1))
    return np.stack(out).astype(np.uint8)


def image_folder(root: Path, classes: int, per_class: int, size: int = 40) -> Path:
    """An ImageFolder tree; even images as PNG, odd ones as JPEG; sizes vary a little."""
    images = real_images(classes * per_class, size)
    for i, img in enumerate(images):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img).resize((size + (i % 3) * 4, size))
        pil.save(folder / f"img_{i:04d}.{'png' if i % 2 == 0 else 'jpg'}", quality=95)
    return root


def cifar(root: Path, classes: int, n_train: int = 12, n_test: int = 6) -> Path:
    x = real_images(n_train + n_test, 32).transpose(0, 3, 1, 2).reshape(-1, 3072)
    labels = [int(i % classes) for i in range(n_train + n_test)]
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        per = n_train // 5
        for b in range(5):
            sl = slice(b * per, (b + 1) * per)
            _dump(folder / f"data_batch_{b + 1}", {"data": x[sl], "labels": labels[sl]})
        _dump(folder / "test_batch", {"data": x[n_train:], "labels": labels[n_train:]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _dump(folder / "train", {"data": x[:n_train], "fine_labels": labels[:n_train]})
        _dump(folder / "test", {"data": x[n_train:], "fine_labels": labels[n_train:]})
    return root


def mnist(root: Path, n_train: int = 10, n_test: int = 5) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = real_images(n, 28)[..., 0]
        y = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{stem}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in x.shape) + x.tobytes())
        with gzip.open(raw / f"{stem}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + y.tobytes())
    return root


def imagenet32(root: Path, per_batch: int = 2, n_val: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for b in range(1, 11):
        x = real_images(per_batch, 32, seed=b).transpose(0, 3, 1, 2).reshape(-1, 3072)
        _dump(root / f"train_data_batch_{b}", {"data": x, "labels": [b, 1000][:per_batch],
                                               "mean": x.mean(0)})
    x = real_images(n_val, 32, seed=99).transpose(0, 3, 1, 2).reshape(-1, 3072)
    _dump(root / "val_data", {"data": x, "labels": list(range(1, n_val + 1))})
    return root


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)

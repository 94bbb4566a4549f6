"""Sparse parity: the write-up's generator, EP = BP gradients, and the turned-around results."""
import numpy as np
import pytest
import torch

from helpers import compare, ep_estimator
from pcn_ep.core import MLP
from pcn_ep.data import SparseParityDataModule, sparse_parity
from pcn_ep.experiments.parity import run


@pytest.mark.parametrize("seed, secret", [(42, [0, 15, 17]), (43, [6, 9, 19]), (44, [9, 14, 15])])
def test_generator_secrets_equal_the_spec(seed, secret):
    x, y, drawn = sparse_parity(20, 3, 500, seed)
    assert drawn == secret
    assert set(np.unique(x)) == {-1.0, 1.0} and np.array_equal(y, x[:, secret].prod(1))
    data = SparseParityDataModule(20, 3, 500, 200, seed)
    data.setup()
    xt, yt = data.splits["test"]
    fresh = np.random.RandomState(seed + 1000)
    fresh.choice(20, 3, replace=False)  # the test seed's own secret draw, discarded
    assert np.array_equal(xt.numpy(), fresh.choice([-1.0, 1.0], size=(200, 20)).astype(np.float32))
    assert torch.equal(yt, torch.tensor((xt[:, secret].prod(1) > 0).long()))


def test_n3_seed_42_never_sees_one_input():
    x, _, secret = sparse_parity(3, 3, 50, 42)
    assert secret == [0, 1, 2]
    assert not (x == [-1, -1, 1]).all(1).any()
    xt, _, _ = sparse_parity(3, 3, 50, 1042, secret)
    assert (xt == [-1, -1, 1]).all(1).sum() == 7


def test_parity_mlp_ep_gradient_equals_backprop():
    torch.manual_seed(42)
    net = MLP(20, 2, hidden=(200,)).double()
    data = SparseParityDataModule(20, 3, 64, 8, 42)
    data.setup()
    x, y = data.splits["train"]
    cos, rel, _ = compare(net, x.double(), y, ep_estimator("ce", beta=1e-3, K=4))
    assert min(cos) >= 0.9999, cos


@pytest.mark.parametrize("seed", [42, 43, 44])
def test_pcn_ep_solves_n20_k3_with_the_writeup_sizes(seed):
    result = run("pcn-ep", "n20k3", seed)
    assert result.test_acc >= 0.99 and result.train_acc == 1.0


@pytest.mark.parametrize("seed, test_floor", [(42, 0.86), (43, 1.0), (44, 1.0)])
def test_pcn_ep_on_n3_k3(seed, test_floor):
    result = run("pcn-ep", "n3k3", seed)
    assert result.train_acc == 1.0 and result.test_acc >= test_floor


def test_hopfield_writeup_config_fails_and_the_corrected_one_learns():
    failed = run("hopfield-writeup", "n20k3", 42, epochs=2)
    assert failed.test_acc <= 0.8
    learned = run("hopfield-corrected", "n20k3", 42, epochs=12)
    assert learned.test_acc >= 0.95

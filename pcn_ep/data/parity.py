"""Sparse parity: the task of the failed EP write-up, with its exact generator."""
from __future__ import annotations

import numpy as np
import torch

from .base import TensorDataModule


MAX_SEED = 2**32 - 1 - 1000  # numpy seeds are < 2**32, and the test split uses seed + 1000


def check_task(n_bits: int, k_sparse: int, n_samples: int, seed: int | None = None) -> None:
    """Reject a task the generator cannot draw, with a message that names the bad value."""
    if n_bits < 1:
        raise ValueError(f"n_bits must be >= 1, got {n_bits}")
    if not 1 <= k_sparse <= n_bits:
        raise ValueError(f"k_sparse must be in 1..n_bits = {n_bits}, got {k_sparse}")
    if n_samples < 1:
        raise ValueError(f"the number of examples must be >= 1, got {n_samples}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in 0..{MAX_SEED}, got {seed}")


def sparse_parity(n_bits: int, k_sparse: int, n_samples: int, seed: int,
                  secret: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The write-up's generator: ``RandomState(seed)`` draws the secret, then ±1 inputs.

    With ``secret`` given (the test split), the seed's own secret draw is made and discarded, so
    the inputs are those of the original code, labelled with the training secret.
    """
    check_task(n_bits, k_sparse, n_samples)
    rng = np.random.RandomState(seed)
    drawn = sorted(rng.choice(n_bits, k_sparse, replace=False).tolist())
    secret = drawn if secret is None else secret
    x = rng.choice([-1.0, 1.0], size=(n_samples, n_bits))
    y = np.prod(x[:, secret], axis=1)
    return x, y, secret


class SparseParityDataModule(TensorDataModule):
    """Train on ``sparse_parity(n, k, n_train, seed)``; test on seed + 1000 with the train secret.

    Labels are class indices (0 for y = −1, 1 for y = +1) for the CE-trained PCN; ``y_pm`` gives
    the ±1 labels. The validation split is the test split (the write-up has no other).
    """

    num_classes = 2

    def __init__(self, n_bits: int = 20, k_sparse: int = 3, n_train: int = 500,
                 n_test: int = 200, seed: int = 42, batch_size: int = 32) -> None:
        super().__init__(batch_size, seed)
        self.n_bits, self.k_sparse, self.n_train, self.n_test = n_bits, k_sparse, n_train, n_test

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        check_task(self.n_bits, self.k_sparse, self.n_test, self.seed)
        x, y, self.secret = sparse_parity(self.n_bits, self.k_sparse, self.n_train, self.seed)
        xt, yt, _ = sparse_parity(self.n_bits, self.k_sparse, self.n_test, self.seed + 1000,
                                  self.secret)

        def split(a, b):
            return torch.tensor(a, dtype=torch.float32), torch.tensor((b > 0).astype(np.int64))

        test = split(xt, yt)
        self.set_splits({"train": split(x, y), "test": test, "val": test},
                        f"sparse parity (n={self.n_bits}, k={self.k_sparse}, seed {self.seed})")

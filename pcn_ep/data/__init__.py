"""Data modules. They know nothing of PCNs or EP."""
from .base import EpochShuffle, TensorDataModule
from .digits import DigitsDataModule
from .parity import SparseParityDataModule, sparse_parity

__all__ = ["EpochShuffle", "TensorDataModule", "DigitsDataModule", "SparseParityDataModule",
           "sparse_parity"]

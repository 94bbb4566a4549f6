"""Data modules. They know nothing of PCNs or EP."""
from .base import EpochShuffle, TensorDataModule
from .digits import DigitsDataModule

__all__ = ["EpochShuffle", "TensorDataModule", "DigitsDataModule"]

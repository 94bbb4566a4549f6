"""Data modules. They know nothing of PCNs or EP, and import neither core, training, tools nor experiments."""
from .base import DataError, EpochShuffle, TensorDataModule
from .digits import DigitsDataModule, MnistSubsetDataModule
from .folder import ImageFolderDataModule
from .images import ImageDataModule
from .imagenet import ImageNetDataModule
from .parity import SparseParityDataModule, sparse_parity

__all__ = ["DataError", "EpochShuffle", "TensorDataModule", "DigitsDataModule", "MnistSubsetDataModule", "ImageDataModule", "ImageFolderDataModule", "ImageNetDataModule", "SparseParityDataModule",
           "sparse_parity"]

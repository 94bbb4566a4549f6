"""A user's own LightningDataModule (not one the package ships), with one bad batch on purpose:
the module must catch it at its boundary, whatever made the data."""
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class UserData(L.LightningDataModule):
    """64 random 1×16×16 images of 10 classes per split, batch 8; in ``split``, batch 1 carries
    ``fault``: ``high`` (a label = 10), ``negative`` (a label = -1), ``nan`` or ``inf`` inputs;
    ``rank``: only that DDP rank's copy of the data has the fault (rank 1's shard holds it)."""

    def __init__(self, split: str = "none", fault: str = "none", rank: int | None = None) -> None:
        super().__init__()
        self.split, self.fault, self.rank = split, fault, rank

    def _loader(self, split: str) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
        if split == self.split and self.rank in (None, self.trainer.global_rank):
            bad = 8 + 3  # batch 1
            if self.fault == "high":
                y[bad] = 10
            elif self.fault == "negative":
                y[bad] = -1
            elif self.fault in ("nan", "inf"):
                x[bad, 0, 4, 4] = float(self.fault)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

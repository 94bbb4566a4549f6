"""Run by tests/test_ddp.py: a 2-process CPU (gloo) DDP fit that records what each rank saw.

    python tests/ddp_worker.py coverage OUT_DIR {ffcv,folder} DATA_PATH
    python tests/ddp_worker.py gradient OUT_DIR

Lightning's ``ddp`` strategy re-launches this script for rank 1.
"""
import sys
from pathlib import Path

import lightning as L
import torch

from pcn_ep.core import MLP
from pcn_ep.data import ImageNetDataModule, TensorDataModule
from pcn_ep.training.module import PCNEPModule


class SeenLabels(L.LightningModule):
    """Records the labels of every training batch (each image has its own class)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out, self.seen = out, []

    def training_step(self, batch, batch_idx):
        self.seen += batch[1].tolist()

    def on_train_epoch_end(self):
        torch.save(self.seen, self.out / f"seen_rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Fixed(TensorDataModule):
    """8 fixed examples; under DDP the distributed sampler gives each rank 4 of them."""

    num_classes = 3

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        self.splits = {"train": (x, y), "val": (x, y), "test": (x, y)}


class GradientRecorder(PCNEPModule):
    def training_step(self, batch, batch_idx):
        self._batch = batch
        return super().training_step(batch, batch_idx)

    def manual_backward(self, loss, *args, **kwargs):
        super().manual_backward(loss, *args, **kwargs)
        torch.save({"x": self._batch[0], "y": self._batch[1],
                    "grads": [p.grad.clone() for p in self.network.parameters()]},
                   self.out / f"grads_rank{self.global_rank}.pt")


def trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode == "coverage":
        backend, path = sys.argv[3], sys.argv[4]
        data = ImageNetDataModule(path, path, backend=backend, num_classes=24, image_size=32,
                                  val_resize=36, batch_size=4, num_workers=1, drop_last=False)
        trainer().fit(SeenLabels(out), data)
    else:
        L.seed_everything(0)
        module = GradientRecorder(MLP(12, 3, hidden=(16,)).double(), K=3, beta=0.01, lr=0.0)
        module.out = out
        data = Fixed(batch_size=4)
        trainer(limit_train_batches=1).fit(module, data)


if __name__ == "__main__":
    main()

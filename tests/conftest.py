"""Test-wide settings: one thread per process (2-core CI), W&B never touches the network, and no
test writes into the checkout (outputs go under ``tmp_path``)."""
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("runs", "results", "wandb", "lightning_logs", "data")  # where a run's files would land


def checkout_outputs() -> set[Path]:
    """The checkout's top-level entries and two levels of its output folders: a test that writes
    runs/CONFIG/... or results/TABLE/... into the checkout adds one of these."""
    found = {p for p in ROOT.iterdir() if p.name not in (".git", "__pycache__")}
    for name in OUTPUTS:
        top = ROOT / name
        if top.is_dir():
            below = list(top.iterdir())
            found |= set(below) | {q for p in below if p.is_dir() for q in p.iterdir()}
    return found


@pytest.fixture(autouse=True)
def writes_nothing_into_the_checkout(request):
    before = checkout_outputs()
    yield
    new = sorted(str(p.relative_to(ROOT)) for p in checkout_outputs() - before)
    assert not new, f"{request.node.nodeid} wrote into the checkout: {new} (write under tmp_path)"

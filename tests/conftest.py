"""Test-wide settings: one thread per process (2-core CI), W&B never touches the network."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

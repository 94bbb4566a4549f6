#!/usr/bin/env bash
# Install pcn-ep with its test extras and run the whole suite (README's second command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[dev]"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
python -m pytest -q "$@"

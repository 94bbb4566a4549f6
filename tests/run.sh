#!/usr/bin/env bash
# Install pcn-ep with its test and FFCV extras and run the whole suite (README's second command;
# CI runs it). FFCV builds against system libraries: on Debian/Ubuntu they are installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import ffcv" 2>/dev/null && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libturbojpeg0-dev libopencv-dev \
    pkg-config >/dev/null
fi
python -m pip install --quiet -e ".[dev,ffcv]"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
python -m pytest -q "$@"

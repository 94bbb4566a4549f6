#!/usr/bin/env bash
# Fig. 2: test error over a beta x K grid, VGG5 CIFAR-100 MSE nudge, 20 epochs. 36 runs.
#   reproduce/table_beta_K.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group table_beta_K, tags = the cell) and to OUT/table_beta_K/; the report lands in
# OUT/report/table_beta_K.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce table_beta_K "$@"

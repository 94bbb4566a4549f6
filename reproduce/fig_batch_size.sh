#!/usr/bin/env bash
# Fig. 4: batch size 16 / 64 / 256, VGG5 CIFAR-100 MSE, EP and BP (test and train error curves).
#   reproduce/fig_batch_size.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group fig_batch_size, tags = the cell) and to OUT/fig_batch_size/; the report lands in
# OUT/report/fig_batch_size.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce fig_batch_size "$@"

#!/usr/bin/env bash
# Fig. 5: sync vs async traversal x K in {5, 10, 20} x alpha in {0.1, 0.5, 1}, VGG5 CIFAR-100. 18 runs.
#   reproduce/fig_traversal.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group fig_traversal, tags = the cell) and to OUT/fig_traversal/; the report lands in
# OUT/report/fig_traversal.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce fig_traversal "$@"

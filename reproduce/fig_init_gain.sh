#!/usr/bin/env bash
# Fig. 3: output-layer init gain 0.2 vs 1.0, VGG5 ImageNet32 MSE, EP and BP.
#   reproduce/fig_init_gain.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group fig_init_gain, tags = the cell) and to OUT/fig_init_gain/; the report lands in
# OUT/report/fig_init_gain.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce fig_init_gain "$@"

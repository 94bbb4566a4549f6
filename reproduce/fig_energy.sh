#!/usr/bin/env bash
# Fig. 8: total energy F vs nudge iteration K, VGG10, mod-PGD and PGD at +-beta, 8 validation images.
# --energy-ckpt FILE traces a trained VGG10 (e.g. table_top5's last.ckpt); default: at initialization.
#   reproduce/fig_energy.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group fig_energy, tags = the cell) and to OUT/fig_energy/; the report lands in
# OUT/report/fig_energy.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce fig_energy "$@"

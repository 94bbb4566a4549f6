#!/usr/bin/env bash
# Table 2 and Sec. 5.5: VGG10 (centered EP, random EP, BP) and VGG10Skip (centered EP, BP) on
# ImageNet via FFCV: --data-root imagenet=DIR with train.beton and val.beton. Each run uses all GPUs (DDP).
#   reproduce/table_top5.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group table_top5, tags = the cell) and to OUT/table_top5/; the report lands in
# OUT/report/table_top5.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce table_top5 "$@"

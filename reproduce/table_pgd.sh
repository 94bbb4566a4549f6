#!/usr/bin/env bash
# Table 3 / Fig. 7: PGD vs mod-PGD with K = 5 and 10, VGG5 MSE nudge on CIFAR-10, CIFAR-100 and
# ImageNet32, 3 seeds. 36 runs.
#   reproduce/table_pgd.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group table_pgd, tags = the cell) and to OUT/table_pgd/; the report lands in
# OUT/report/table_pgd.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce table_pgd "$@"

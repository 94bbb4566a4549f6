#!/usr/bin/env bash
# Table 1: VGG5, {MSE, CE} x {EP, BP} on MNIST, CIFAR-10, CIFAR-100 and ImageNet32, 3 seeds. 48 runs.
#   reproduce/table_costs.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group table_costs, tags = the cell) and to OUT/table_costs/; the report lands in
# OUT/report/table_costs.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce table_costs "$@"

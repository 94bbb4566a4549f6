#!/usr/bin/env bash
# Fig. 1: {CE-nudge, MSE-nudge, clamp} x {forward, backward, centered, random} schemes,
# VGG5 on CIFAR-100 and ImageNet32 (configs/vgg5_{cifar100,imagenet32}_{ce,mse,clamp}.yaml). 24 runs.
#   reproduce/table_schemes.sh [--data-root NAME=PATH ...] [--gpus N] [--seeds S ...] [--out DIR] [--smoke]
#       [--launcher slurm --partition P --account A --gpus-per-run G --time D-HH:MM:SS] [--dry-run]
# Every run logs to W&B (group table_schemes, tags = the cell) and to OUT/table_schemes/; the report lands in
# OUT/report/table_schemes.md and .png. Options: python -m pcn_ep reproduce --help
exec python -m pcn_ep reproduce table_schemes "$@"

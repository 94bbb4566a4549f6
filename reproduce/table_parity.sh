#!/usr/bin/env bash
# Sparse parity (spec/sparse_parity.md): PCN-EP, Hopfield-EP (the write-up's configuration and the
# corrected one), and backprop on n=3/k=3 and n=20/k=3, seeds 42 43 44, beside the write-up's numbers.
#   reproduce/table_parity.sh [--seeds 42 43 44] [--out results/parity] [--smoke] [--dry-run]
# --smoke: the same grid with 3 epochs per run (checks the script end to end in about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/parity seeds=(42 43 44) extra=() dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --seeds) shift; seeds=(); while [ $# -gt 0 ] && [[ $1 != --* ]]; do seeds+=("$1"); shift; done ;;
    --smoke) extra=(--epochs 3); shift ;;
    --dry-run) dry=1; shift ;;
    *) echo "table_parity.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cmd=(python -m pcn_ep parity --seeds "${seeds[@]}" --json "$out/parity.json" "${extra[@]}")
if [ "$dry" = 1 ]; then echo "OMP_NUM_THREADS=1 ${cmd[*]}"; exit 0; fi   # as reproduce TABLE --dry-run
mkdir -p "$out"
export OMP_NUM_THREADS=1   # the challenge's budget is one CPU thread
"${cmd[@]}" | tee "$out/parity.md"

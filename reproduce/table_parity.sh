#!/usr/bin/env bash
# Sparse parity (spec/sparse_parity.md), two tables:
#  - parity.md: PCN-EP, Hopfield-EP (the write-up's configuration and the corrected one) and backprop
#    on the write-up's tasks (n=3/k=3 and n=20/k=3), beside the write-up's numbers;
#  - variants.md: PCN-EP and backprop on harder tasks (larger n, larger k, thousands of examples).
# Each ends with the data-movement table (Weighted ARD of one training step, every method).
#   reproduce/table_parity.sh [--seeds 42 43 44] [--out DIR] [--smoke] [--dry-run] [--overwrite]
# Writes under the folder it is run from: results/parity/ (--smoke: results/smoke/parity/, 1 epoch
# per run, to check the script end to end in a few minutes), or --out DIR. A folder that already
# holds tables (an earlier run, or the results shipped in the checkout) is refused unless
# --overwrite.
set -euo pipefail
out="" seeds=(42 43 44) extra=() dry=0 overwrite=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --seeds) shift; seeds=(); while [ $# -gt 0 ] && [[ $1 != --* ]]; do seeds+=("$1"); shift; done ;;
    --smoke) extra=(--epochs 1); shift ;;
    --dry-run) dry=1; shift ;;
    --overwrite) overwrite=1; shift ;;
    *) echo "pcn_ep: error: table_parity.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$out" ]; then
  if [ ${#extra[@]} -gt 0 ]; then out=results/smoke/parity; else out=results/parity; fi
fi
if [ "$dry" = 0 ] && [ "$overwrite" = 0 ] && { [ -e "$out/parity.md" ] || [ -e "$out/variants.md" ]; }; then
  echo "pcn_ep: error: table_parity.sh: $out already holds parity tables; pass --out DIR for a new" \
       "folder, or --overwrite to replace them" >&2
  exit 2
fi
# n k n_train n_test: k = 5 at n = 50 is the grid's boundary (not learned by either method)
variants=("30 3 2000 1000" "50 3 2000 1000" "20 4 2000 1000" "30 4 3000 1000" "40 4 5000 1000"
          "50 4 5000 1000" "20 5 5000 1000" "30 5 5000 1000" "50 5 5000 1000")
run() {  # run JSON MARKDOWN ARGS...: one invocation; its tables are appended to MARKDOWN
  local json=$1 md=$2; shift 2
  local cmd=(python -m pcn_ep parity --seeds "${seeds[@]}" "$@" --json "$out/$json" "${extra[@]}")
  if [ "$dry" = 1 ]; then echo "OMP_NUM_THREADS=1 ${cmd[*]}"; return; fi
  { echo "\`${cmd[*]}\`"; echo; "${cmd[@]}"; echo; } | tee -a "$out/$md"
}
if [ "$dry" = 0 ]; then mkdir -p "$out/variants"; rm -f "$out/parity.md" "$out/variants.md"; fi
export OMP_NUM_THREADS=1   # the challenge's budget is one CPU thread
run parity.json parity.md
for v in "${variants[@]}"; do
  read -r n k train test <<< "$v"
  run "variants/n${n}k${k}.json" variants.md --n-bits "$n" --k-sparse "$k" --n-train "$train" \
    --n-test "$test"
done

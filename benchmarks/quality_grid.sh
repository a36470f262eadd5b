#!/usr/bin/env bash
# The quality benchmark's grid as reproduce.sh's `quality` part runs it, on one GPU:
#   bash benchmarks/quality_grid.sh OUT [quality.py options...]
# Sort 10 digits in 200 steps (a setting where full fine-tuning and LoRA differ), three seeds, each method's own
# learning-rate grid. One process pretrains the small base into OUT/quality-base (or finds it there); then a process
# per seed and base runs side by side (the model is tiny: one process leaves the GPU mostly idle), each writing its
# rows as they finish; then one table over all of their rows (quality.py --report). Logs: OUT/quality-<tag>-*.log.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/quality_grid.sh OUT [quality.py options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
q() { python3 "$here/quality.py" --base "$OUT/quality-base" --out "$OUT" --sort-length 10 --steps 200 "$@"; }
tag=grid-$(date -u +%Y%m%dT%H%M%S)
q --pretrain-only "$@"
pids=()
for seed in 0 1 2; do
  for base in plain zeroed; do
    q --seeds "$seed" --bases "$base" --tag "$tag" "$@" > "$OUT/quality-$tag-$seed-$base.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || echo "a grid process failed (exit $status): see $OUT/quality-$tag-*.log" >&2
python3 "$here/quality.py" --out "$OUT" --report "$tag"
exit "$status"

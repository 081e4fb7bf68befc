#!/usr/bin/env bash
# benchmarks/quality.py as N shard processes on one machine (on a GPU the tiny bench models leave it
# mostly idle, so N runs share it), then one table of all shards' runs, and the load while they ran.
#   benchmarks/quality_shards.sh N OUTDIR [benchmarks.quality arguments...]
# QUALITY_LIMIT_S (optional): seconds from now after which no shard starts another run.
set -u
n=$1 out=$2
shift 2
mkdir -p "$out"
stop=()
[ -n "${QUALITY_LIMIT_S:-}" ] && stop=(--stop-by $(( $(date +%s) + QUALITY_LIMIT_S )))
(while sleep 20; do
  echo "$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" \
       "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
done) > "$out/load.txt" &
monitor=$!
pids=()
for k in $(seq 0 $((n - 1))); do
  OMP_NUM_THREADS=1 python -m benchmarks.quality --shard "$k/$n" --jsonl "$out/runs-$k.jsonl" \
    --out "$out/shard-$k" "${stop[@]}" "$@" > "$out/log-$k.txt" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
kill "$monitor"
python -m benchmarks.quality --report-only --jsonl "$out"/runs-*.jsonl --out "$out/quality" "$@"

#!/usr/bin/env bash
# The judge-parity benchmarks on one GPU, as run for benchmarks/results/judge_parity.md: the KL objective
# (8 shards of benchmarks/kl_objective.py) and the advancement rule (one benchmarks/tournament_rule.py
# process per loss task), all sharing the GPU; then both reports.
#   benchmarks/judge_parity_gpu.sh BENCH_DIR MODEL OUT_DIR [RULE_JSONL_TO_REUSE]
# RULE_JSONL_TO_REUSE: earlier rule runs (e.g. the defenders' c_strong/b_trl runs) not to retrain.
# RULE_ONLY=1: the advancement rule alone; ALT="lr_x3 lora": alternative challengers trained and judged beside
# ours in the same run (the candidates for a recipe change, tournament_rule.py --alt); ALT_DPO: those of the
# DPO tasks (default: ALT); BUDGETS="25 60": the wall-clock seconds of each run.
set -u
bench=$1 model=$2 out=$3 reuse=${4:-}
mkdir -p "$out"
[ -n "${RULE_ONLY:-}" ] || for k in 0 1 2 3 4 5 6 7; do
  OMP_NUM_THREADS=1 python -m benchmarks.kl_objective --bench "$bench" --model "$model" --budget-s 30 --seeds 1 2 3 \
    --shard $k/8 --jsonl "$out/kl-$k.jsonl" --out "$out/kl-shard-$k" > "$out/kl-log-$k.txt" 2>&1 &
done
for t in instruct_wordplay instruct_pattern_induction chat_topical_dialogue dpo_fact_verification dpo_logical_reasoning; do
  alt=${ALT:-}; case $t in dpo_*) alt=${ALT_DPO:-$alt};; esac
  [ -n "$reuse" ] && grep "\"task\": \"$t\"" "$reuse" > "$out/rule-$t.jsonl"
  OMP_NUM_THREADS=2 python -m benchmarks.tournament_rule --bench "$bench" --model "$model" --tasks $t --budgets ${BUDGETS:-25 60} \
    --seeds 1 --alt $alt --jsonl "$out/rule-$t.jsonl" --models "$out/models" --out "$out/rule-out-$t" > "$out/rule-log-$t.txt" 2>&1 &
done
wait
[ -n "${RULE_ONLY:-}" ] || python -m benchmarks.kl_objective --report-only --jsonl "$out"/kl-*.jsonl --out "$out/kl_objective"
python -m benchmarks.tournament_rule --report-only --budgets ${BUDGETS:-25 60} --model "$model" --jsonl "$out"/rule-*.jsonl \
  --out "$out/judge_parity_rule"

#!/usr/bin/env bash
# The GPU speed benchmarks of benchmarks/results/throughput.md in one call on one GPU:
# SFT tokens/s (plain HF, TRL's best with and without Liger, ours) on 1B full and 8B LoRA, DPO pairs/s
# (TRL DPOTrainer, + Liger, ours), then the 8B job's time to its first optimizer step (the validator's
# command, and the worker's start-up phase by phase).
#   benchmarks/speed_gpu.sh BENCH_DIR LENGTHS_JSON OUT_DIR
# BENCH_DIR holds tasks/{instruct_wordplay,dpo_fact_verification} and models/pico-llama (its tokenizer);
# LENGTHS_JSON: `python benchmarks/throughput.py lengths --out lengths.json` where ../shared is.
set -u
bench=$1 lengths=$2 out=$3
mkdir -p "$out"
python benchmarks/throughput.py run --lengths "$lengths" --cases llama1b-full,llama8b-lora \
  --variants hf,trl_sdpa,trl_flex,trl_sdpa_liger,ours --warm 3 --timed 6 --out "$out/sft"
python benchmarks/throughput_dpo.py --task "$bench/tasks/dpo_fact_verification" --tokenizer "$bench/models/pico-llama" \
  --cases llama1b-full,llama8b-lora --variants trl,trl_liger,ours --out "$out/dpo"
python benchmarks/first_step.py make --shape llama8b --tokenizer "$bench/models/pico-llama" --out /tmp/llama8b
python benchmarks/first_step.py e2e --model /tmp/llama8b --task "$bench/tasks/instruct_wordplay" --out "$out/e2e" --limit-s 300
for d in --direct ""; do
  python benchmarks/first_step.py phases --model /tmp/llama8b --task "$bench/tasks/instruct_wordplay" $d >> "$out/first_step.txt"
done
python benchmarks/throughput.py report "$out/sft/throughput.jsonl" > "$out/sft/report.md"

#!/usr/bin/env bash
# Planner vs measured peak memory: lorafuse's fast path on 1B-8B shapes, LoRA and QLoRA, several
# batch x length, each model generated on the GPU (--random-init, nothing on disk), then the seed's two headline
# sizes under a memory cap. Every run prints the planner's prediction before it starts; the measured peaks are
# appended to benchmarks/measured_memory.jsonl (tests/plan/test_measured.py checks the planner against them).
#   bash benchmarks/memory_sweep.sh [OUT_DIR] [MEMORY_LOG] [sweep|headline|all]
set -u
OUT=${1:-benchmarks/results}
LOG=${2:-benchmarks/measured_memory.jsonl}
WHICH=${3:-all}
here=$(cd "$(dirname "$0")" && pwd)
bench() { timeout 300 python3 "$here/bench.py" --random-init --stacks lorafuse --steps 4 --warmup 2 \
          --out "$OUT" --memory-log "$LOG" --timeout 240 "$@" || echo "FAILED: $*"; }
if [ "$WHICH" != headline ]; then
  bench --shape tinyllama-1.1b --methods qlora --batch 8 --seq 1024
  bench --shape llama3.2-1b --methods lora --batch 4 --seq 2048
  bench --shape llama3.2-3b --methods qlora,lora --batch 4 --seq 1024
  bench --shape qwen2.5-1.5b --methods qlora --batch 2 --seq 2048
  bench --shape llama2-7b --methods qlora --batch 1 --seq 4096
  bench --shape llama2-7b --methods qlora,lora --batch 8 --seq 2048
  bench --shape llama3-8b --methods qlora,lora --batch 2 --seq 2048
  bench --shape mistral-7b --methods qlora --batch 4 --seq 1024
fi
if [ "$WHICH" != sweep ]; then
  # The seed's headline sizes: a 65B-shape QLoRA step in 40 GiB (QLoRA paper: 48 GB), and Llama-2-7B QLoRA at
  # 2048 tokens in fp16 within a free Colab T4's 15 GiB.
  bench --shape llama-65b --methods qlora --batch 1 --seq 512 --budget-gib 40
  bench --shape llama2-7b --methods qlora --batch 1 --seq 2048 --dtype float16 --budget-gib 15
fi

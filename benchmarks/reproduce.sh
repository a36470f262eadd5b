#!/usr/bin/env bash
# The runs behind the README's results table, one command a part, run from anywhere in the checkout on a GPU machine:
#   bash benchmarks/reproduce.sh PART [OUT]
# Rows go to OUT (default benchmarks/results) as <date>-<card>.jsonl; lorafuse's measured peaks to
# OUT/measured_memory.jsonl when OUT is given, else benchmarks/measured_memory.jsonl. The peers (unsloth,
# bitsandbytes, peft) and pytest must be importable; where pip cannot reach the GPU machine, carry the peers as
# .anchors/peers-bundle.tgz and pytest's wheels in .whl/ (benchmarks/README.md), and this script installs them.
#   qlora       QLoRA 4 x 512 at the defaults: lorafuse, Unsloth and the HF recipe in one call
#   lean        QLoRA 4 x 512, lorafuse's leanest memory setting, against Unsloth at its defaults
#   fp8         QLoRA 4 x 512, train.fp8 with the lean memory setting, against Unsloth and the HF recipe
#   lora        LoRA on a bf16 base, 4 x 512: lorafuse against Unsloth
#   1x4096      QLoRA, one 4,096-token sequence: lorafuse against Unsloth
#   1x4096-fp8  the same with train.fp8, lorafuse alone
#   8x2048      QLoRA, 8 x 2,048 tokens: lorafuse against Unsloth
#   8x2048-fp8  the same with train.fp8, lorafuse alone
#   dpo         DPO on QLoRA, 4 pairs x 512 tokens: lorafuse, Unsloth and TRL's DPOTrainer (the HF recipe) in one call
#   dpo-8bit    the same with --optimizer adamw_8bit: every stack's 8-bit states on the GPU, so every peak counts them
#               (bitsandbytes' paged states live in CUDA managed memory, outside torch's counter)
#   dpo-lorafuse  the same DPO step, lorafuse alone on a random-init model (its CUDA graphs on)
#   dpo-eager   the same, --no-graphs (run right after dpo-lorafuse on one machine for the ratio)
#   dpo-separate  the same as dpo-lorafuse with a row per answer (--shared-prompt off), for the shared prompt's ratio
#   job         QLoRA 4 x 512: the `lorafuse train` job itself beside the harness's step, and Unsloth
#   memory      the planner against measured peaks on 1B-8B shapes (benchmarks/memory_sweep.sh)
#   headline    a 65B-shape QLoRA step under a 40 GiB cap; Llama-2-7B QLoRA at 2,048 tokens in fp16 under 15 GiB
#   tests       every GPU test (pytest -m gpu)
#   quality     fine-tuning quality: full, LoRA, QLoRA, fast path, FP8, the seed's stack; sort 10 digits, 200 steps, 3 seeds
#               (benchmarks/quality_grid.sh: a pretraining, 4-7 min on one H100, then 6 processes side by side, ~5 min)
#   quality-tables  the same with the embedding and the output head trained whole at their own rate, 1.6e-2
#               (lora.modules_to_save, train.modules_to_save_lr; full fine-tuning's tables at that rate too); with OUT
#               of a quality run its base is reused
#   quality-token-rows  lorafuse's adapters with their token rows at their own rate, 1.6e-2 (train.token_rows_lr; full
#               fine-tuning has no token rows: compare with the quality part's full); with OUT of a quality run its
#               base is reused
#   quality-loraplus  the adapters with train.loraplus_lr_ratio 16 at their own rates (full fine-tuning has no B
#               matrices: compare with the quality part's full); with OUT of a quality run its base is reused
set -euo pipefail
PART=${1:?usage: bash benchmarks/reproduce.sh PART [OUT] (parts: see the head of this file)}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
OUT=${2:-benchmarks/results}
LOG=benchmarks/measured_memory.jsonl
[ -n "${2:-}" ] && LOG=$OUT/measured_memory.jsonl
mkdir -p "$OUT"
if [ -f .anchors/peers-bundle.tgz ]; then
  mkdir -p /tmp/peers && tar xzf .anchors/peers-bundle.tgz -C /tmp/peers
  export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .whl ] && ! python3 -c "import pytest" 2>/dev/null; then
  pip install -q --no-index --find-links .whl pytest --target /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
bench() { python3 benchmarks/bench.py --out "$OUT" --memory-log "$LOG" "$@"; }
case "$PART" in
  qlora) bench --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora ;;
  lean) bench --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth --methods qlora --offload --host-embeddings --host-head --dequant-cap-mib 48 ;;
  fp8) bench --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora --fp8 --offload --host-embeddings --host-head --dequant-cap-mib 48 ;;
  lora) bench --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth --methods lora ;;
  1x4096) bench --shape llama2-7b --batch 1 --seq 4096 --stacks lorafuse,unsloth --methods qlora --steps 6 --warmup 3 ;;
  1x4096-fp8) bench --shape llama2-7b --batch 1 --seq 4096 --stacks lorafuse --methods qlora --random-init --fp8 --steps 4 --warmup 2 ;;
  8x2048) bench --shape llama2-7b --batch 8 --seq 2048 --stacks lorafuse,unsloth --methods qlora --steps 4 --warmup 2 ;;
  8x2048-fp8) bench --shape llama2-7b --batch 8 --seq 2048 --stacks lorafuse --methods qlora --random-init --fp8 --steps 4 --warmup 2 ;;
  dpo) bench --shape llama2-7b --objective dpo --pairs 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora --timeout 300 ;;
  dpo-8bit) bench --shape llama2-7b --objective dpo --pairs 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora --timeout 300 --optimizer adamw_8bit ;;
  dpo-lorafuse) bench --shape llama2-7b --objective dpo --pairs 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 8 --warmup 3 ;;
  dpo-eager) bench --shape llama2-7b --objective dpo --pairs 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 8 --warmup 3 --no-graphs ;;
  dpo-separate) bench --shape llama2-7b --objective dpo --pairs 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 8 --warmup 3 --shared-prompt off ;;
  job) bench --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth --methods qlora --job ;;
  memory) bash benchmarks/memory_sweep.sh "$OUT" "$LOG" sweep ;;
  headline) bash benchmarks/memory_sweep.sh "$OUT" "$LOG" headline ;;
  tests) python3 -m pytest -q -m gpu tests ;;
  quality) bash benchmarks/quality_grid.sh "$OUT" ;;
  quality-tables) bash benchmarks/quality_grid.sh "$OUT" --modules-to-save embed_tokens,lm_head --modules-lr 1.6e-2 ;;
  quality-token-rows) bash benchmarks/quality_grid.sh "$OUT" --token-rows-lr 1.6e-2 --methods "lora,qlora,qlora+fast,qlora+fast+fp8" ;;
  quality-loraplus) bash benchmarks/quality_grid.sh "$OUT" --loraplus-ratio 16 --lrs 2e-4,5e-4,1e-3 --methods "lora,qlora,qlora+fast,qlora+fast+fp8,seed lora,seed qlora" ;;
  *) echo "unknown part '$PART': qlora lean fp8 lora 1x4096 1x4096-fp8 8x2048 8x2048-fp8 dpo dpo-8bit dpo-lorafuse dpo-eager dpo-separate job memory headline tests quality quality-tables quality-token-rows quality-loraplus" >&2; exit 2 ;;
esac

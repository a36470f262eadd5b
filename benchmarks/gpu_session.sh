#!/usr/bin/env bash
# GPU checks and measurements in parts that each fit one device call (10 minutes at most). Run from the checkout
# on the GPU machine, with the peers bundle carried in .anchors/ and pytest wheels in .whl/:
#   LORAFUSE_COMMIT=<local HEAD> bash benchmarks/gpu_session.sh tests|dropout|shapes|offload|memory|ab  $OUT
# Pass LORAFUSE_COMMIT from your own checkout: the device's copy of .git can lag behind the working tree it gets
# (seen 2026-11-28: `git rev-parse HEAD` there named an older commit than the files it ran). Unset, bench records HEAD and
# flags the row dirty when the files differ from it.
#   tests    every GPU test (kernels, graphs incl. dropout, offload, the loop with graphs)       ~4 min
#   dropout  the 7B bench with the seed's LoRA dropout 0.05: graphs vs --no-graphs vs peers     ~6 min
#   shapes   1 x 4096 and 8 x 2048 against both peers                                          ~9 min
#   offload  activation offload vs checkpointing at a long sequence (memory and step time)     ~4 min
#   memory   4 x 512 and 8 x 2048: graphs vs graphs + offload + embedding in host memory        ~4 min
#   ab       4 x 512, the q|k|v group on and off (LORAFUSE_QKV_GROUP), each with a profile        ~2 min
#   lean     4 x 512 with offload + both tables on the host: bench + memory_peak's phase listing   ~2 min
#   peers    4 x 512: lorafuse, Unsloth, HF in one run, then lorafuse with 18 kept layers         ~5 min
#   stream   the streamed head's GPU tests; lean 4 x 512: the head streamed, staged whole
#            (LORAFUSE_HEAD_STREAM=0), a 48 MiB dequantization cap, that and an 8 MiB cuBLAS workspace;
#            memory_peak with the cap                                                           ~9 min
#   leanpeers the streamed head's GPU tests; the same-run trio at 4 x 512; lean with an 8 MiB cuBLAS
#            workspace, without and with the 48 MiB dequantization cap                          ~8 min
#   final    graphs' and the streamed head's GPU tests; lorafuse vs Unsloth at 4 x 512, defaults, then
#            lorafuse lean (offload, both tables on the host, 48 MiB dequantization cap) vs Unsloth  ~7 min
#   llama3   the graphs' stream GPU tests; Llama-3-8B 2 x 2048 lean with the head streamed and staged whole
#            (predicted 4.58 against 5.44 GiB), then lorafuse vs Unsloth at its defaults            ~9 min
#   verify   the graphs', host head's and streamed head's GPU tests in full; the FP8 probe (fp8_probe.py);
#            Llama-3-8B 2 x 2048 lean, the head streamed and staged whole                           ~8 min
#   fp8      FP8 and NF4 kernels' GPU tests; 7B 4 x 512: bf16, --fp8, --fp8 lean, LoRA --fp8; loss curves   ~5 min
#   fp8cap   FP8 GPU tests; fp8peers with a 48 MiB dequantization cap; 1 x 4096 and 8 x 2048 with --fp8       ~6 min
#   last     every kernel GPU test; FP8 4 x 512 with and without fast accumulation at K <= 4096      ~5 min
#   fp8bwd   FP8 GPU tests (incl. the backward's); every kernel GPU test; 4 x 512 --fp8 with the backward's dX in FP8
#            and without (LORAFUSE_FP8_BACKWARD), lean too; loss curves                         ~9 min
#   trio     7B 4 x 512 in one run: lorafuse --fp8 lean with the 48 MiB cap, Unsloth and the seed's recipe at their
#            defaults                                                                          ~8 min
#   fp8t     FP8 GPU tests; fp8_probe.py --decode (the transposed decode's new tile); 4 x 512 --fp8 with the
#            backward's dX in FP8 and without, then lean + 48 MiB cap with it                    ~6 min
#   final8   fp8_grads.py (7B 4 x 512: LoRA gradients' error, bf16 / FP8 forward / FP8 forward + backward); the trio
#            with the FP8 backward on; 1 x 4096 and 8 x 2048 with it                            ~7 min
#   grads    fp8_grads.py at 7B 4 x 512 with 4 layers, then all 32 at init std 0.01 and 0.005      ~5 min
#   bwdab    1 x 4096 and 8 x 2048 --fp8, the backward's dX in FP8 off and on (LORAFUSE_FP8_BACKWARD), one machine ~5 min
#   decode   fp8_probe.py --decode: the decodes, dY's quantization and dX, eager and from a CUDA graph    ~2 min
#   fp8peers 7B 4 x 512: lorafuse --fp8 lean (offload, both tables on the host) against Unsloth at its defaults ~4 min
#   tokens   trainable token rows' GPU tests: the fused loss with the rows, a QLoRA run on the fast path with graphs ~2 min
#   qcal     quality.py calibration: full, lora and qlora+fast at lr 1e-3 and 3e-3 (full well above 50%, LoRA above 0) ~3 min
#   quality  quality.py, the whole grid: 7 methods x 3 learning rates x 2 bases                          ~6 min
# Unsloth needs more than 80 s per runner to load and compile a 7B: keep --timeout at 150 or more.
set -u
PART=${1:?tests|dropout|shapes|offload|memory|ab|lean|peers|stream|leanpeers|final|llama3|verify|fp8|fp8peers|fp8cap|last|fp8bwd|trio|fp8t|final8|grads|bwdab|decode|tokens|qcal|quality}
OUT=${2:-/tmp/out}
mkdir -p /tmp/peers /tmp/site "$OUT"
[ -f .anchors/peers-bundle.tgz ] && tar xzf .anchors/peers-bundle.tgz -C /tmp/peers
[ -d .whl ] && pip install -q --no-index --find-links .whl pytest --target /tmp/site >/dev/null 2>&1
export PYTHONPATH=/tmp/peers:$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
B="python3 benchmarks/bench.py --out $OUT --memory-log $OUT/measured_memory.jsonl --timeout 150"
case "$PART" in
  tests)
    LORAFUSE_AUTOTUNE=0 timeout 540 python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/kernels tests/train/test_graphs.py tests/train/test_offload.py tests/train/test_gpu.py \
      tests/train/test_optim.py tests/model/test_host_embedding.py tests/model/test_host_head.py 2>&1 | tail -30 ;;
  dropout)
    timeout 560 $B --shape llama2-7b --batch 4 --seq 512 --dropout 0.05 --stacks lorafuse,hf,unsloth \
      --methods qlora --steps 10 --warmup 3 2>&1 | tail -12
    timeout 200 $B --shape llama2-7b --batch 4 --seq 512 --dropout 0.05 --stacks lorafuse --methods qlora \
      --no-graphs --steps 10 --warmup 3 2>&1 | tail -5 ;;
  shapes)
    timeout 280 $B --shape llama2-7b --batch 1 --seq 4096 --stacks lorafuse,unsloth,hf --methods qlora \
      --steps 6 --warmup 3 2>&1 | tail -10
    timeout 280 $B --shape llama2-7b --batch 8 --seq 2048 --stacks lorafuse,unsloth,hf --methods qlora \
      --steps 4 --warmup 2 2>&1 | tail -10 ;;
  offload)
    for gc in on offload; do
      extra=""; [ "$gc" = offload ] && extra="--offload"
      timeout 200 $B --shape llama2-7b --batch 1 --seq 8192 --stacks lorafuse --methods qlora --random-init \
        --steps 4 --warmup 2 $extra 2>&1 | tail -4
    done ;;
  memory)
    for extra in "" "--offload --host-embeddings"; do
      timeout 100 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init \
        --steps 10 --warmup 3 $extra 2>&1 | tail -2
      timeout 120 $B --shape llama2-7b --batch 8 --seq 2048 --stacks lorafuse --methods qlora --random-init \
        --steps 3 --warmup 3 $extra 2>&1 | tail -2
    done ;;
  ab)
    for group in 1 0; do
      LORAFUSE_QKV_GROUP=$group timeout 100 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse \
        --methods qlora --random-init --steps 10 --warmup 3 --profile "$OUT/prof-qkv-group-$group" 2>&1 | tail -2
    done ;;
  lean)
    timeout 100 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init \
      --steps 10 --warmup 3 --offload --host-embeddings --host-head 2>&1 | tail -2
    timeout 120 python3 benchmarks/memory_peak.py --shape llama2-7b --method qlora --batch 4 --seq 512 --offload \
      --host-embeddings --host-head --out "$OUT" 2>&1 | grep -A12 highest_windows ;;
  peers)
    timeout 330 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora \
      --steps 10 --warmup 3 2>&1 | tail -9
    timeout 80 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init \
      --steps 10 --warmup 3 --keep-layers 18 2>&1 | tail -1 ;;
  stream)
    LORAFUSE_AUTOTUNE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_streamed_head.py \
      tests/model/test_host_head.py tests/kernels/test_lora_linear.py -k "streamed or stream or head or cap" 2>&1 | tail -8
    L="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 10 --warmup 3"
    L="$L --offload --host-embeddings --host-head"
    timeout 100 $B $L 2>&1 | tail -1
    LORAFUSE_HEAD_STREAM=0 timeout 100 $B $L 2>&1 | tail -1
    LORAFUSE_DEQUANT_CAP_MIB=48 timeout 100 $B $L 2>&1 | tail -1
    LORAFUSE_DEQUANT_CAP_MIB=48 CUBLAS_WORKSPACE_CONFIG=:4096:2 timeout 100 $B $L 2>&1 | tail -1
    LORAFUSE_DEQUANT_CAP_MIB=48 timeout 120 python3 benchmarks/memory_peak.py --shape llama2-7b --method qlora \
      --batch 4 --seq 512 --offload --host-embeddings --host-head --out "$OUT" 2>&1 | grep -A12 highest_windows ;;
  leanpeers)
    LORAFUSE_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_streamed_head.py \
      tests/model/test_host_head.py 2>&1 | grep -E "Error|passed|failed" | tail -8
    timeout 330 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora \
      --steps 10 --warmup 3 2>&1 | tail -9
    L="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 10 --warmup 3"
    L="$L --offload --host-embeddings --host-head"
    CUBLAS_WORKSPACE_CONFIG=:4096:2 timeout 100 $B $L 2>&1 | tail -1
    LORAFUSE_DEQUANT_CAP_MIB=48 CUBLAS_WORKSPACE_CONFIG=:4096:2 timeout 100 $B $L 2>&1 | tail -1 ;;
  final)
    LORAFUSE_AUTOTUNE=0 timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_graphs.py \
      tests/kernels/test_streamed_head.py 2>&1 | grep -E "Error|assert|passed|failed" | tail -12
    P="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth --methods qlora --steps 10 --warmup 3"
    timeout 200 $B $P 2>&1 | tail -6
    timeout 200 $B $P --offload --host-embeddings --host-head --dequant-cap-mib 48 2>&1 | tail -6 ;;
  llama3)
    LORAFUSE_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_graphs.py \
      -k "evaluation or workspace" 2>&1 | grep -E "Error|assert|passed|failed" | tail -6
    L="--shape llama3-8b --batch 2 --seq 2048 --stacks lorafuse --methods qlora --random-init --steps 6 --warmup 3"
    L="$L --offload --host-embeddings --host-head"
    timeout 150 $B $L 2>&1 | tail -1
    LORAFUSE_HEAD_STREAM=0 timeout 150 $B $L 2>&1 | tail -1
    timeout 280 $B --shape llama3-8b --batch 2 --seq 2048 --stacks lorafuse,unsloth --methods qlora --steps 6 \
      --warmup 3 2>&1 | tail -5 ;;
  verify)
    LORAFUSE_AUTOTUNE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_graphs.py \
      tests/kernels/test_streamed_head.py tests/model/test_host_head.py 2>&1 | grep -E "Error|assert|passed|failed" | tail -12
    timeout 90 python3 benchmarks/fp8_probe.py --out "$OUT" 2>&1 | tail -12
    L="--shape llama3-8b --batch 2 --seq 2048 --stacks lorafuse --methods qlora --random-init --steps 6 --warmup 3"
    L="$L --offload --host-embeddings --host-head"
    timeout 140 $B $L 2>&1 | tail -1
    LORAFUSE_HEAD_STREAM=0 timeout 140 $B $L 2>&1 | tail -1 ;;
  fp8)
    LORAFUSE_AUTOTUNE=0 timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_fp8.py \
      tests/kernels/test_nf4_dequant.py tests/kernels/test_swiglu_mlp.py 2>&1 | grep -E "Error|assert|passed|failed" | tail -12
    L="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --random-init --steps 10 --warmup 3"
    timeout 90 $B $L --methods qlora 2>&1 | tail -1
    timeout 90 $B $L --methods qlora --fp8 2>&1 | tail -1
    timeout 90 $B $L --methods qlora --fp8 --offload --host-embeddings --host-head 2>&1 | tail -1
    timeout 90 $B $L --methods lora --fp8 2>&1 | tail -1
    timeout 150 python3 benchmarks/loss_curves.py --steps 50 --out "$OUT" 2>&1 | tail -9 ;;
  fp8peers)
    timeout 250 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth --methods qlora --steps 10 \
      --warmup 3 --fp8 --offload --host-embeddings --host-head 2>&1 | tail -6 ;;
  fp8cap)
    LORAFUSE_AUTOTUNE=0 timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_fp8.py 2>&1 \
      | grep -E "Error|assert|passed|failed" | tail -6
    timeout 250 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth --methods qlora --steps 10 \
      --warmup 3 --fp8 --offload --host-embeddings --host-head --dequant-cap-mib 48 2>&1 | tail -6
    for s in "1 4096" "8 2048"; do set -- $s
      timeout 100 $B --shape llama2-7b --batch $1 --seq $2 --stacks lorafuse --methods qlora --random-init --steps 4 \
        --warmup 2 --fp8 2>&1 | tail -1
    done ;;
  last)
    LORAFUSE_AUTOTUNE=0 timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 \
      | grep -E "Error|assert|passed|failed" | tail -8
    L="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 10 --warmup 3 --fp8"
    for k in 4096 0; do LORAFUSE_FP8_FAST_ACCUM_MAX_K=$k timeout 80 $B $L 2>&1 | tail -1; done ;;
  fp8bwd)
    LORAFUSE_AUTOTUNE=0 timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 \
      | grep -E "Error|assert|passed|failed" | tail -8
    L="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 10 --warmup 3 --fp8"
    for b in 1 0; do LORAFUSE_FP8_BACKWARD=$b timeout 70 $B $L 2>&1 | tail -1; done
    LORAFUSE_FP8_BACKWARD=1 timeout 70 $B $L --offload --host-embeddings --host-head --dequant-cap-mib 48 2>&1 | tail -1
    timeout 170 python3 benchmarks/loss_curves.py --steps 50 --out "$OUT" 2>&1 | tail -7 ;;
  fp8t)
    LORAFUSE_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_fp8.py 2>&1 \
      | grep -E "Error|assert|passed|failed" | tail -6
    timeout 60 python3 benchmarks/fp8_probe.py --decode --out "$OUT" 2>&1 | tail -6
    L="--shape llama2-7b --batch 4 --seq 512 --stacks lorafuse --methods qlora --random-init --steps 10 --warmup 3 --fp8"
    for b in 1 0; do LORAFUSE_FP8_BACKWARD=$b timeout 70 $B $L 2>&1 | grep -E "^qlora|Error" | tail -2; done
    LORAFUSE_FP8_BACKWARD=1 timeout 70 $B $L --offload --host-embeddings --host-head --dequant-cap-mib 48 2>&1 \
      | grep -E "^qlora|Error" | tail -2 ;;
  final8)
    timeout 200 python3 benchmarks/fp8_grads.py --out "$OUT" 2>&1 | tail -6
    LORAFUSE_FP8_BACKWARD=1 timeout 250 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth,hf \
      --methods qlora --steps 10 --warmup 3 --fp8 --offload --host-embeddings --host-head --dequant-cap-mib 48 2>&1 \
      | tail -8
    for s in "1 4096" "8 2048"; do set -- $s
      LORAFUSE_FP8_BACKWARD=1 timeout 60 $B --shape llama2-7b --batch $1 --seq $2 --stacks lorafuse --methods qlora \
        --random-init --steps 4 --warmup 2 --fp8 2>&1 | grep -E "^qlora|Error" | tail -2
    done ;;
  grads)
    for a in "--layers 4" "--init-range 0.01" "--init-range 0.005"; do
      timeout 150 python3 benchmarks/fp8_grads.py --out "$OUT" $a 2>&1 | tail -5
    done ;;
  bwdab)
    for s in "1 4096" "8 2048"; do set -- $s
      for b in 0 1; do
        LORAFUSE_FP8_BACKWARD=$b timeout 60 $B --shape llama2-7b --batch $1 --seq $2 --stacks lorafuse --methods qlora \
          --random-init --steps 4 --warmup 2 --fp8 2>&1 | grep -E "^qlora|Error" | tail -2
      done
    done ;;
  decode)
    timeout 150 python3 benchmarks/fp8_probe.py --decode --out "$OUT" 2>&1 | tail -6 ;;
  trio)
    timeout 560 $B --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,unsloth,hf --methods qlora --steps 10 \
      --warmup 3 --fp8 --offload --host-embeddings --host-head --dequant-cap-mib 48 2>&1 | tail -8 ;;
  tokens)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_cross_entropy.py \
      tests/train/test_token_rows_run.py 2>&1 | tail -15 ;;
  qcal)
    timeout 400 python3 benchmarks/quality.py --methods full,lora,qlora+fast --lrs 1e-3,3e-3 --out "$OUT" 2>&1 | tail -24 ;;
  quality)
    timeout 590 python3 benchmarks/quality.py --out "$OUT" 2>&1 | tail -32 ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac

"""GPU memory of one LoRA/QLoRA training step, predicted from the model's shape (no weights read).

Notation: V vocab, D hidden, F MLP width, L layers, H/Hkv query/key-value heads, d_h head dim, Dq = H d_h,
Dkv = Hkv d_h, r LoRA rank, B micro-batch, T sequence length, N = B T tokens, c bytes of the compute dtype
(2 for bf16/fp16), l bytes of the LoRA dtype (4: fp32 adapters, as peft).

Static memory (held through the whole step)
  * NF4 weights, per linear of n elements, blocksize b = 64 (bitsandbytes' format):
        packed codes ceil(n/2) B  +  absmax: ceil(n/b) fp32 (4 B each), or with double quantization one uint8
        code each plus ceil(ceil(n/b)/256) fp32 second-level scales  +  per-weight tables: the 16-entry NF4
        code (64 B), with double quantization the 256-entry dynamic map (1 KiB) and the fp32 offset (4 B).
    => 4 + 8/64 + 32/(64*256) = 4.127 bits per weight with double quantization, 4.5 without.
  * 16-bit weights (c bytes): embeddings, head (unless tied), norms, biases; with quant "none" every linear too.
  * LoRA A (r x in) and B (out x r) in fp32 + their gradients (fp32). Full fine-tuning: every weight's
    gradient in the compute dtype.
  * Optimizer states: AdamW fp32 m and v = 8 B per trainable element (in the parameter's dtype for torch's
    AdamW on 16-bit weights: 2c). 8-bit AdamW: one uint8 code per element per state + one fp32 absmax per
    256 elements per state = 2 + 8/256 B; tensors under 4096 elements keep fp32 states (8 B). Paged 8-bit
    (lorafuse.training.optim8bit.AdamW8bit._under_pressure) pages only under memory pressure: its states stay on the
    GPU, like adamw_8bit's, unless they would take more than 5% of the card or leave less than 10% of it free at
    the first update; then they live in pinned host memory and the GPU holds at most two parameters' states.
    The planner counts them on the GPU (LoRA states are ~0.5% of a card: 81 MB for Llama-2-7B r=16), so when
    they do page the prediction is high by their size. (Measured on an H200, benchmarks/measured_memory.jsonl: the
    rows with the states on the GPU are 0.0757 GiB above the rows with them paged, exactly these states.)

Saved activations (what each op's autograd node keeps, with and without checkpointing) and the buffers of one
layer's backward and forward: plan/activations.py.

Transient buffers at the peak
  * the backward of one layer and a late layer's forward: plan/activations.py.
  * NF4 dequantization: the largest weight dequantized, fp32 values then the c-byte copy ((4 + c) n); the
    fused Triton dequant writes only the c-byte copy.
  * loss, reference path (model(labels=...)): the c-byte logits (the output holds them), log_softmax's fp32
    output, and in backward two fp32 (N, V) gradients (nll, then log_softmax): (c + 12) V per token.
    lorafuse.training.loss (chunked): 2^25 / V rows at a time, loss and gradient in one pass: fp32 logits, the
    logsumexp temporary and the c-byte softmax copy ((8 + c) V per row), and the gradient w.r.t. the hidden
    states (c D per token) saved for backward. The fused Triton loss keeps a (rows, V) c-byte logits block
    of at most 256 MiB (lorafuse.kernels.cross_entropy) plus the same c D per token; with more than one
    chunk, TWO blocks are alive at each chunk boundary (the next chunk's GEMM output is allocated before the
    previous block's last reference goes). Measured on an H200 (benchmarks/memory_peak.py): the
    loss-phase workspace was 0.515 GiB for Qwen2.5-1.5B at 4096 tokens (5 chunks) and 0.535 GiB for
    TinyLlama at 8192 (2 chunks), vs 0.338 GiB for Llama-2-7B at 4096 (one chunk).
Peak = static + max(end of forward: saved + loss; backward of the top layer: saved (less the final norm's,
already freed) + recompute + transients; optimizer step: all gradients; with the head staged from host memory,
also a late layer's forward: saved + head + that layer's forward buffers), each phase with the gradients alive
then (`gradient_bytes`: with one micro-batch per step, only the top layer's at the top layer's backward).
Reported peak_alloc is what torch.cuda.max_memory_allocated would show; the GPU total adds the CUDA context
(not seen by the allocator) and the caching allocator's slack (reserved but free). Both are rough constants,
to be calibrated against benchmarks/measured_memory.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorafuse.plan.activations import forward_transient_bytes, layer_transient_bytes, saved_bytes
from lorafuse.plan.placement import host_embedding, host_head, streamed_head
from lorafuse.plan.workload import Workload, targeted

GIB = 1024**3
LOSS_CHUNK_ELEMENTS = 2**25  # logits per chunk in lorafuse.training.loss (its _LOGIT_ELEMENTS)
FUSED_LOSS_BLOCK_BYTES = 256 << 20  # lorafuse.kernels.cross_entropy.LOGITS_BUDGET_BYTES
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # H100/A100, CUDA 12, lazy module loading; T4 ~0.3 GiB
ALLOCATOR_SLACK = 0.05  # reserved-but-free fraction of the caching allocator at the peak
MIN_8BIT_SIZE = 4096
# cuBLAS workspaces come from the caching allocator, one per handle and stream: the main thread's and the autograd
# backward thread's, 32 MiB each on Hopper with torch 2.11 (measured: two 32 MiB blocks alive between steps on an
# H200). CUDA graphs warm up and capture on one stream (training/graphs.py), so they add none.
CUBLAS_WORKSPACE_BYTES = 2 * (32 << 20)
STATE_BLOCK = 256


@dataclass
class Estimate:
    components: dict = field(default_factory=dict)  # name -> bytes, at the peak
    peak_alloc: int = 0  # torch.cuda.max_memory_allocated
    peak: int = 0  # + CUDA context + allocator slack
    phase: str = ""  # where the peak happens
    trainable: int = 0


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Bytes of one NF4 weight of `numel` elements, by part (bitsandbytes' storage format)."""
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        return {
            "packed": math.ceil(numel / 2),
            "absmax": blocks,
            "nested_absmax": 4 * math.ceil(blocks / 256),
            "tables": 64 + 1024 + 4,
        }
    return {"packed": math.ceil(numel / 2), "absmax": 4 * blocks, "nested_absmax": 0, "tables": 64}


def allocator_block(n: int) -> int:
    """Bytes torch's caching allocator books for one tensor of n bytes (what memory_allocated counts): a multiple
    of 512; from 10 MiB up a tensor gets its own segment, rounded up to 2 MiB, whose tail is kept with it unless
    it is over 1 MiB (measured: each 21.5 MiB packed NF4 weight of a 7B MLP holds a 22 MiB block)."""
    block = -(-n // 512) * 512
    if n < (10 << 20):
        return block
    segment = -(-n // (2 << 20)) * (2 << 20)
    return segment if segment - n <= (1 << 20) else block


def optimizer_bytes(numels: list[int], name: str, param_bytes: int = 4) -> int:
    """GPU bytes of AdamW states for trainable tensors of these sizes (module docstring)."""
    if not numels:
        return 0
    if name == "adamw":
        return sum(2 * param_bytes * n for n in numels)

    def eight_bit(n: int) -> int:
        return 8 * n if n < MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / STATE_BLOCK)

    if name in ("adamw_8bit", "paged_adamw_8bit"):  # paged: on the GPU unless under pressure (docstring)
        return sum(eight_bit(n) for n in numels)
    raise ValueError(f"unknown optimizer {name!r}")


def _layer_numels(w: Workload) -> list[int]:
    """Trainable tensors of one decoder layer: LoRA A and B (+ DoRA magnitudes), or every linear (full)."""
    if w.method == "full":
        return [lin.numel for lin in w.shape.linears()]
    per_layer = []
    for lin in targeted(w):
        per_layer += [w.r * lin.in_features, lin.out_features * w.r] + ([lin.out_features] if w.dora else [])
    return per_layer


def _extra_numels(w: Workload) -> list[int]:
    """Trainable tensors outside the decoder layers (modules_to_save copies; full: embeddings, head, norms)."""
    s = w.shape
    if w.method == "full":
        return [s.embed_params, s.head_params, s.norm_params, s.bias_params]
    extra = [s.embed_params for m in w.modules_to_save if m == "embed_tokens"]
    return extra + [s.vocab_size * s.hidden_size for m in w.modules_to_save if m == "lm_head"]


def trainable_numels(w: Workload) -> list[int]:
    """Sizes of the trainable tensors: LoRA A and B (+ DoRA magnitudes) per layer, modules_to_save copies."""
    return _layer_numels(w) * w.shape.num_layers + _extra_numels(w)


def gradient_bytes(w: Workload) -> dict:
    """Gradient bytes alive at each phase of a step: {"loss": ..., "backward": ..., "optimizer": ...}.

    The loop (and the benchmark) zero gradients with set_to_none=True after every optimizer step, and autograd
    allocates a .grad when the tensor's first gradient arrives. So with one micro-batch per step the step's
    backward starts with none: at the top layer's backward only the tensors outside the layers (a trainable
    head's gradient comes with the loss; an embedding's, at the very end, is counted too: an upper bound) and
    the top layer's exist. From the second micro-step of a window on, all of them are already allocated. With
    CUDA graphs the gradients are never freed (a replay accumulates into the tensors the capture recorded, and
    the loop zeroes them in place), so all of them are alive in every phase, as with accumulation.
    """
    each = w.compute_bytes if w.method == "full" else w.lora_bytes
    full = each * sum(trainable_numels(w))
    if w.grad_accum > 1 or w.cuda_graphs:
        return {"loss": full, "backward": full, "optimizer": full}
    extra = each * sum(_extra_numels(w))
    return {"loss": extra, "backward": extra + each * sum(_layer_numels(w)), "optimizer": full}


def weight_bytes(w: Workload) -> dict:
    """Static weights: {"weights_nf4": ..., "weights_16bit": ...}."""
    s, c = w.shape, w.compute_bytes
    small = c * (s.embed_params + s.head_params + s.norm_params + s.bias_params)
    if host_embedding(w):
        small -= c * s.embed_params
    if host_head(w):
        small -= c * s.head_params
    if w.method == "qlora":
        per_layer = sum(
            sum(allocator_block(v) for v in nf4_bytes(lin.numel, w.blocksize, w.double_quant).values())
            for lin in s.linears()
        )
        return {"weights_nf4": per_layer * s.num_layers, "weights_16bit": small}
    return {"weights_nf4": 0, "weights_16bit": small + c * s.linear_params}


def loss_bytes(w: Workload) -> int:
    """Loss workspace: logits, log-probabilities and their gradients for all tokens or one chunk."""
    s, c = w.shape, w.compute_bytes
    if w.loss == "full":
        return (c + 12) * s.vocab_size * w.tokens
    if w.loss == "fused":
        rows = min(w.tokens, max(16, FUSED_LOSS_BLOCK_BYTES // (s.vocab_size * c)))
        blocks = 1 if rows >= w.tokens else 2  # two alive at a chunk boundary (module docstring)
        return blocks * c * s.vocab_size * rows + c * s.hidden_size * w.tokens
    rows = min(w.tokens, max(1, LOSS_CHUNK_ELEMENTS // s.vocab_size))
    return (8 + c) * s.vocab_size * rows + c * s.hidden_size * w.tokens


def dequant_bytes(w: Workload) -> int:
    if w.method != "qlora":
        return 0
    cap = w.dequant_cap_mib << 20  # KernelOptions.dequant_cap_bytes

    def part(lin) -> int:  # the rows dequantized at once under the cap, cut at NF4's row alignment
        if w.kernels != "fused" or not cap or lin.numel * w.compute_bytes <= cap:
            return lin.numel
        unit = w.blocksize * (256 if w.double_quant else 1)
        step = unit // math.gcd(unit, lin.in_features)
        rows = -(-lin.out_features // -(-lin.numel * w.compute_bytes // cap))
        return min(lin.out_features, -(-rows // step) * step) * lin.in_features

    largest = max(part(lin) for lin in w.shape.linears())
    return (w.compute_bytes if w.kernels == "fused" else 4 + w.compute_bytes) * largest


def static_bytes(w: Workload, numels: list[int]) -> dict:
    """What a step holds throughout: weights, LoRA parameters (with autocast's copies), optimizer states, cuBLAS."""
    c, trainable = w.compute_bytes, sum(numels)
    # autocast's cached cast of each LoRA weight; the fused kernels run with autocast off (module docstring)
    lora_copy = c if w.autocast and w.lora_bytes > c and w.kernels != "fused" else 0
    return {
        **weight_bytes(w),
        "lora_params": 0 if w.method == "full" else (w.lora_bytes + lora_copy) * trainable,
        "optimizer_states": optimizer_bytes(numels, w.optimizer, c if w.method == "full" else w.lora_bytes),
        "cublas_workspace": CUBLAS_WORKSPACE_BYTES,
    }


# The step's parts that come and go, in the order Estimate.components lists them after the static ones.
_DYNAMIC = (
    "gradients",
    "activations",
    "recompute",
    "backward_workspace",
    "forward_workspace",
    "logits_loss",
    "head_staged",
)


def _phases(w: Workload) -> tuple[tuple[str, dict], ...]:
    """The dynamic bytes of each phase of a step that can hold the peak (module docstring, "Peak"), by part."""
    s, c, n = w.shape, w.compute_bytes, w.tokens
    grads = gradient_bytes(w)
    saved, final_norm, whole_layer = saved_bytes(w)
    # fused: the recomputed input_layernorm saves the layer input the checkpoint holds (module docstring)
    held = c * s.hidden_size if w.kernels == "fused" else 0
    recompute = 0 if w.checkpointing == "off" else whole_layer - held * n
    transient = layer_transient_bytes(w) * n + dequant_bytes(w)
    # The final norm's saved tensors are freed by its backward, before the top layer's.
    # a head kept in host memory is staged on the device from the middle of the forward to the end of the loss
    # or only a few vocabulary chunks of it, streamed through the loss
    staged, loss = streamed_head(w) or (c * s.head_params if host_head(w) else 0, loss_bytes(w))
    # With the head staged, a late layer's forward can top the loss and the backward: the head, the inputs saved
    # so far and one layer's forward buffers (the lean 7B 4 x 512 peak measured on an H200, benchmarks/NOTES.md).
    forward = (
        {
            "gradients": grads["loss"],
            "activations": saved - final_norm,
            "head_staged": staged,
            "forward_workspace": forward_transient_bytes(w) * n + dequant_bytes(w),
        }
        if staged
        else {}
    )
    return (
        ("loss", {"gradients": grads["loss"], "activations": saved, "logits_loss": loss, "head_staged": staged}),
        ("forward", forward),
        (
            "backward",
            {
                "gradients": grads["backward"],
                "activations": saved - final_norm,
                "recompute": recompute,
                "backward_workspace": transient,
            },
        ),
        ("optimizer step", {"gradients": grads["optimizer"]}),
    )


def estimate(w: Workload) -> Estimate:
    """Predicted peak memory of one training step and its parts (bytes)."""
    numels = trainable_numels(w)
    phase, dynamic = max(_phases(w), key=lambda kv: sum(kv[1].values()))
    components = {**static_bytes(w, numels), **{k: dynamic.get(k, 0) for k in _DYNAMIC}}
    peak_alloc = sum(components.values())
    slack = int(ALLOCATOR_SLACK * peak_alloc)
    components.update(allocator_slack=slack, cuda_context=CUDA_CONTEXT_BYTES)
    return Estimate(
        components=components,
        peak_alloc=peak_alloc,
        peak=peak_alloc + slack + CUDA_CONTEXT_BYTES,
        phase=phase,
        trainable=sum(numels),
    )

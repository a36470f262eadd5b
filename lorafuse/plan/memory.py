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

Saved activations of one Llama layer with LoRA, per token, reference path (transformers ops + LoRALinear),
derived from what each op's autograd node keeps (PyTorch saves an input only if a gradient needs it; every
base weight is frozen, so a base matmul saves nothing and an NF4 matmul keeps only the NF4Weight object):
  * 2 RMSNorms: transformers casts x to fp32; pow() saves that copy: 2 x 4D. (rsqrt's (N,1) output: ~0.)
  * each LoRA linear of input width d_in: x.to(fp32) feeds lora_A, which saves it (l d_in); with dropout > 0
    dropout's output is saved instead plus a bool mask (l d_in + d_in); lora_B saves x A (l r). q, k and v
    each cast their input separately, so three copies. (If l == c and no dropout, the copy is the shared
    input itself: one tensor per distinct input.) Under autocast (lorafuse's loop and the HF Trainer on a
    GPU) lora_A/lora_B save autocast's c-byte casts instead (c d_in, c r), and autocast keeps a c-byte copy
    of every LoRA weight for the backward (counted with the LoRA parameters). The fused kernels run with
    autocast off and cast A and B per call (transient, r (in + out) elements): no such copy.
  * attention: SDPA/flash saves q (c Dq), k, v (c Dkv each; with a padding mask transformers repeats k/v to
    H heads first: c Dq each), its output (c Dq) and the fp32 logsumexp (4H). RoPE keeps only cos/sin.
    With a padding mask transformers builds one (B, 1, T, T) bool mask (B T^2 bytes, shared) and SDPA keeps
    an additive c-byte copy per layer (c T per token per layer; the flash kernel is then not used).
  * MLP: SiLU saves its input (gate output, c F); act * up saves both factors (c F + c F).
  => no checkpointing, all 7 projections, dropout > 0, l = 4, c = 2, no autocast, no padding mask:
        8D (norms) + 3*5D + 5Dq + 2*5D + 5F (LoRA inputs) + 28r (x A) + 4Dq + 4Dkv + 4H (attention) + 6F (MLP)
     = 42D + 4Dkv + 11F + 28r + 4H bytes per token per layer: Llama-2-7B 303 KiB, x32 layers = 9.5 MiB/token.
  * Full fine-tuning saves each linear's input in c (q/k/v and gate/up share one) and the norms' output.
  * The fused fast path (lorafuse.kernels, train.fast_path) saves the block inputs (c D shared by q/k/v,
    c D for the MLP; o's input is the attention output SDPA already saves: flash and memory-efficient SDPA
    return a transposed view of a (B, T, H, d_h) tensor, so transformers' transpose(1, 2).contiguous() and
    the reshape are no-ops), gate and up outputs (2 c F; SwiGLU is recomputed), q, k, v, out and
    logsumexp, the norms' input + fp32 1/rms (c D + 4 each) and S = x A (c r per linear); no dropout mask.
With checkpointing (non-reentrant, one checkpoint per decoder layer) each layer keeps only its input
hidden state (c D per token); in backward one layer at a time is recomputed, so its full saved set above
exists once, next to the backward's own buffers. The fused RMSNorm saves its input itself, and the recomputed
input_layernorm's input IS the layer input the checkpoint already holds, so the fused recompute adds the saved
set minus c D (HF's RMSNorm saves an fp32 copy, a tensor of its own). With offload the layer inputs sit in
pinned host memory; the GPU keeps two staging buffers and the last layer's input (3 c D per token).

Transient buffers at the peak
  * backward of one layer (estimate): the fp32 LoRA-path gradient of the widest input (l F), three c F
    gradients in the MLP (h, SiLU output and the gate/up outputs are not all alive at once) and two residual
    gradients (2 c D): (l + 3c) F + 2 c D per token. Fused path (swiglu_mlp.py): the top of a layer's backward
    is the MLP's, with all of the layer's recomputed set alive: the incoming gradient (c D), down's input
    gradient dh (c F; SwiGLU's backward then writes h, de, dg over dh, e, g in place) and the (M, D) input
    gradient of gate + up: c F + 2 c D, and F more with train.fp8's backward (dY's e4m3 codes for gate's dX).
    (Recompute's own top, h (c F) and down's output (c D) next to the incoming gradient, is the same size.)
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
from dataclasses import dataclass, field, replace

from lorafuse.plan import policy
from lorafuse.plan.placement import host_embedding, host_head, kept_layers, streamed_head  # noqa: F401 (API)
from lorafuse.plan.shapes import PROJECTIONS, ModelShape

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


def fp8_backward(w) -> bool:
    """Does train.fp8 run the backward's dX in e4m3 too (plan/policy.py: NF4 bases, inside the fused kernels)?"""
    return policy.fp8_backward(w.fp8 and w.kernels == "fused" and w.compute_bytes == 2, w.method == "qlora")


@dataclass(frozen=True)
class Workload:
    """Everything the prediction depends on. `checkpointing`: off | on | offload; `loss`: full | chunked | fused;
    `kernels`: reference | fused; `method`: qlora | lora | full; `cuda_graphs`: the step replays as a CUDA graph
    (its gradients are never freed)."""

    shape: ModelShape
    method: str = "qlora"
    micro_batch: int = 4
    seq: int = 512
    grad_accum: int = 4
    r: int = 16
    targets: tuple = PROJECTIONS
    dropout: float = 0.05
    dora: bool = False
    modules_to_save: tuple = ()
    compute_bytes: int = 2
    lora_bytes: int = 4
    autocast: bool = True
    optimizer: str = "paged_adamw_8bit"
    checkpointing: str = "on"
    loss: str = "chunked"
    kernels: str = "reference"
    padded: bool = True
    blocksize: int = 64
    double_quant: bool = True
    embeddings_on_host: bool = False
    head_on_host: bool = False
    cuda_graphs: bool = False
    uncheckpointed: int = 0  # the last decoder layers keep their activations (train.uncheckpointed_layers)
    dequant_cap_mib: int = 0  # train.dequant_cap_mib (0: whole weights)
    fp8: bool = False  # train.fp8: base GEMMs in e4m3 (the byte buffer is shared; the FP8 backward adds dY's codes)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq

    def with_(self, **kw) -> Workload:
        return replace(self, **kw)


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


def targeted(w: Workload) -> list:
    return [lin for lin in w.shape.linears() if lin.name in w.targets]


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


def _lora_input_bytes(w: Workload) -> int:
    """Per token per layer: what the LoRA branches save (inputs in the LoRA dtype, masks, x A)."""
    c, lb = w.compute_bytes, w.lora_bytes
    lins = targeted(w)
    if w.autocast and lb > c:  # lora_A/lora_B save autocast's c-byte casts, one per projection
        lb = c
        if w.dropout == 0:
            return c * sum(lin.in_features for lin in lins) + c * w.r * len(lins)
    xa = lb * w.r * len(lins)
    if lb == c and w.dropout == 0:  # no cast, no dropout: lora_A saves the shared input itself
        groups = {
            "qkv"
            if lin.name in ("q_proj", "k_proj", "v_proj")
            else "mlp"
            if lin.name in ("gate_proj", "up_proj")
            else lin.name: lin.in_features
            for lin in lins
        }
        return c * sum(groups.values()) + xa
    per_in = lb + (1 if w.dropout > 0 else 0)
    return per_in * sum(lin.in_features for lin in lins) + xa


def layer_saved_bytes(w: Workload) -> int:
    """Bytes per token one decoder layer saves for backward without checkpointing (module docstring)."""
    s, c = w.shape, w.compute_bytes
    D, F, Dq = s.hidden_size, s.intermediate_size, s.num_heads * s.head_dim
    Dkv = Dq if w.padded else s.num_kv_heads * s.head_dim
    attention = c * (Dq + 2 * Dkv) + c * Dq + 4 * s.num_heads + (c * w.seq if w.padded else 0)
    if w.kernels == "fused":  # o_proj's input is SDPA's saved output (module docstring): not counted twice
        lora = c * w.r * len(targeted(w)) if w.method != "full" else 0
        return 2 * (c * D + 4) + attention + 2 * c * F + 2 * c * D + lora
    if w.method == "full":
        norms = 2 * (4 * D + c * D)
        return norms + attention + 3 * c * F + c * (2 * D + Dq + F)
    return 2 * 4 * D + attention + 3 * c * F + _lora_input_bytes(w)


def layer_saved_constant_bytes(w: Workload) -> int:
    """Bytes one decoder layer saves whatever the token count: the fused LoRA ops keep the forward's casts of A
    and s B in the compute dtype for the backward (kernels/lora_linear.py), c r (in + out) per projection."""
    if w.kernels != "fused" or w.method == "full":
        return 0
    return w.compute_bytes * w.r * sum(lin.in_features + lin.out_features for lin in targeted(w))


def layer_transient_bytes(w: Workload) -> int:
    """Bytes per token of the buffers one layer's backward allocates (estimate, module docstring)."""
    c, F, D = w.compute_bytes, w.shape.intermediate_size, w.shape.hidden_size  # the FP8 backward: gate's dY codes
    return (c + fp8_backward(w) if w.kernels == "fused" else w.lora_bytes + 3 * c) * F + 2 * c * D


def forward_transient_bytes(w: Workload) -> int:
    """Bytes per token a late layer's forward holds besides what it saves: gate and up outputs and their SwiGLU
    product (3 c F; the reference MLP also the SiLU output; the fused MLP writes the product over the gate output
    in a checkpointed layer), the norm's and the MLP's outputs (2 c D)."""
    c, F, D = w.compute_bytes, w.shape.intermediate_size, w.shape.hidden_size
    in_place = w.kernels == "fused" and w.checkpointing != "off" and kept_layers(w) == 0
    return (2 if in_place else 3 if w.kernels == "fused" else 4) * c * F + 2 * c * D


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


def saved_bytes(w: Workload) -> tuple[int, int, int]:
    """(activations saved at the end of the forward, the final norm's part of them, one layer's whole saved set)."""
    s, c, n = w.shape, w.compute_bytes, w.tokens
    whole_layer = layer_saved_bytes(w) * n + layer_saved_constant_bytes(w)  # one layer's set, outside a checkpoint
    # The final norm is outside the checkpoints: HF's keeps an fp32 copy of its input, the fused one x and 1/rms.
    final_norm = (c * s.hidden_size + 4 if w.kernels == "fused" else 4 * s.hidden_size) * n
    kept = kept_layers(w)  # layers outside the checkpoints: their whole saved set, not just their input
    if w.checkpointing == "off":
        saved = s.num_layers * whole_layer + final_norm
    elif w.checkpointing == "on":
        saved = (s.num_layers - kept) * c * s.hidden_size * n + kept * whole_layer + final_norm
    else:
        saved = 3 * c * s.hidden_size * n + kept * whole_layer + final_norm
    if w.padded:
        saved += w.micro_batch * w.seq**2
    return saved, final_norm, whole_layer


def estimate(w: Workload) -> Estimate:
    """Predicted peak memory of one training step and its parts (bytes)."""
    s, c, n = w.shape, w.compute_bytes, w.tokens
    numels = trainable_numels(w)
    static, grads = static_bytes(w, numels), gradient_bytes(w)
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
    phases = (
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
    phase, dynamic = max(phases, key=lambda kv: sum(kv[1].values()))
    dynamic = {
        k: dynamic.get(k, 0)
        for k in (
            "gradients",
            "activations",
            "recompute",
            "backward_workspace",
            "forward_workspace",
            "logits_loss",
            "head_staged",
        )
    }
    components = {**static, **dynamic}
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

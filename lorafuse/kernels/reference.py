"""PyTorch references for every lorafuse kernel, with the kernels' signatures.

These are the CPU path of the product and the oracle of the kernel tests: each public op in
`lorafuse.kernels.<op>` calls its `<op>_reference` here for CPU tensors. Autograd differentiates them,
so they need no hand-written backward.

Ops (x: (..., in) activations, compute dtype = x.dtype):
    nf4_dequantize_reference(w, dtype=None, out=None)      NF4Weight -> dense (out, in), fp32 math then cast
    dropout_keep_mask_reference(seed, rows, cols, p, device) the counter-based dropout mask the kernels use
    lora_linear_reference(x, lw)                           y = x W^T + b + s * (drop(x) A^T) B^T
    rms_norm_reference(x, weight, eps)                     y = w * (x / rms(x)).to(x.dtype)   (HF Llama order)
    rope_reference(q, k, cos, sin)                         rotate-half RoPE on (B, T, H, D) q and k
    swiglu_reference(g, u)                                 h = silu(g) * u
    swiglu_mlp_reference(x, gate, up, down)                down(swiglu(gate(x), up(x))), each a LoRA linear
    fused_linear_cross_entropy_reference(hidden, weight, labels, ...)   CE(hidden W^T + b, labels)

Dtype policy: the LoRA matrices are fp32 masters; like the kernels, the references cast them to the
compute dtype for their GEMMs (autograd casts the gradients back to fp32), so a bf16 reference and a
bf16 kernel make the same rounding choices and fp32 models match peft exactly.

Dropout uses a counter-based hash, not torch's RNG: keep[i, j] depends only on (seed, i * cols + j),
so the forward, the backward and the gradient-checkpointing recompute regenerate one mask from one
int seed, on the CPU and on the GPU alike, and nothing mask-sized is ever saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafuse.options import KernelOptions

_M32 = 0xFFFFFFFF
# Wellons' "lowbias32" hash constants (both < 2**31, so int64 products never overflow in torch).
HASH_MUL1, HASH_MUL2 = 0x21F0AAAD, 0x735A2D97
KEEP_BITS = 24  # keep iff (hash >> 8) >= round(p * 2**24): an exact integer test on both sides


def mix32(x):
    """The 32-bit finalizer shared by the dropout kernels (Python int or int64 tensor < 2**32)."""
    x = x ^ (x >> 16)
    x = (x * HASH_MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * HASH_MUL2) & _M32
    return x ^ (x >> 15)


SEED_MUL = 0x61C88647  # odd, < 2**31: spreads a device seed base over 32 bits (the kernels use the same)


@dataclass(frozen=True)
class DropoutSeed:
    """A dropout seed that lives on the device: seed = (base * SEED_MUL + offset) mod 2**32.

    `base` is a 0-dim int64 tensor that the fast path advances once per training forward, ON the device (so a
    CUDA graph replay advances it too); `offset` is fixed per LoRA module, so a checkpoint recompute of the
    same module in the same micro-step regenerates the same mask, and every module gets its own. The kernels
    read `base` through a pointer; `value()` reads it on the host (references and tests; a sync on CUDA).
    """

    base: torch.Tensor
    offset: int

    def value(self) -> int:
        return (int(self.base.item()) % 2**32 * SEED_MUL + self.offset) & _M32


def seed_value(seed) -> int:
    """The integer seed of an int or a DropoutSeed."""
    return seed.value() if isinstance(seed, DropoutSeed) else int(seed)


def dropout_seed_key(seed) -> int:
    """The per-call key XORed into every element counter (31 bits: it travels as a Triton int32)."""
    return mix32(seed_value(seed) & _M32) & 0x7FFFFFFF


def dropout_threshold(p: float) -> int:
    return int(round(p * (1 << KEEP_BITS)))


def dropout_keep_mask_reference(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool (rows, cols): True where dropout keeps element (i, j) for this seed and rate p."""
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    h = mix32(idx ^ dropout_seed_key(seed))
    return ((h >> 8) >= dropout_threshold(p)).view(rows, cols)


@dataclass
class LoRAWeights:
    """One linear layer's operands: y = x W^T + b + scaling * (drop(x) A^T) B^T.

    weight: (out, in) dense tensor (frozen) or an NF4Weight. lora_A: (r, in), lora_B: (out, r), usually
    fp32 Parameters; None for a plain (non-LoRA) linear. seed: the dropout mask's seed, needed when
    dropout_p > 0: an int the caller draws (so a checkpoint recompute can redraw the same one), or a
    DropoutSeed on the device (the fast path's: per module, advanced per forward, CUDA-graph safe).
    opts: what the fused kernels do with it (FP8, the dequantization cap, ...): the run's KernelOptions.
    """

    weight: object
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_p: float = 0.0
    seed: int | DropoutSeed | None = None
    opts: KernelOptions = KernelOptions()

    @property
    def is_nf4(self) -> bool:
        return not isinstance(self.weight, torch.Tensor)

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.is_nf4:
            return nf4_dequantize_reference(self.weight, dtype)
        return self.weight.to(dtype)


def nf4_absmax_reference(w) -> torch.Tensor:
    """fp32 (n_blocks,) scales; through the double quantization when there is one."""
    if w.nested_absmax is None:
        return w.absmax.float()
    n_blocks = w.absmax.numel()
    nested = w.nested_absmax.repeat_interleave(w.nested_blocksize)[:n_blocks]
    return w.nested_code[w.absmax.long()] * nested + w.offset


def nf4_dequantize_reference(w, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode an NF4Weight: element i = code[nibble i] * absmax[i // blocksize] (fp32), cast to dtype.

    Nibble order is bitsandbytes': element 2k is the high nibble of byte k, element 2k+1 the low one.
    """
    dtype = dtype or w.dtype
    n = w.shape.numel()
    packed = w.packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    scale = nf4_absmax_reference(w).repeat_interleave(w.blocksize)[:n]
    dense = (w.code.float()[codes] * scale).to(dtype).view(w.shape)
    if out is None:
        return dense
    view = out.reshape(-1)[:n].view(w.shape)
    view.copy_(dense)
    return view


def _dropout(x2d: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask_reference(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def lora_linear_reference(x: torch.Tensor, lw: LoRAWeights) -> torch.Tensor:
    """y = x W^T + b + s * (drop(x) A^T) B^T for x (..., in), all GEMMs in x.dtype."""
    x2d = x.reshape(-1, x.shape[-1])
    bias = None if lw.bias is None else lw.bias.to(x.dtype)
    y = F.linear(x2d, lw.dense_weight(x.dtype), bias)
    if lw.has_lora:
        s = F.linear(_dropout(x2d, lw.dropout_p, lw.seed), lw.lora_A.to(x.dtype))
        y = y + lw.scaling * F.linear(s, lw.lora_B.to(x.dtype))
    return y.view(*x.shape[:-1], y.shape[-1])


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back to x.dtype, then scale by the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (B or 1, T, D): x * cos + rotate_half(x) * sin.

    Out of place (the kernel rotates in place): callers use the returned pair either way.
    """

    def rotate(x):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.unsqueeze(2) + rot * sin.unsqueeze(2)

    return rotate(q), rotate(k)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_mlp_reference(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights) -> torch.Tensor:
    """The Llama MLP with a LoRA on each projection: down(silu(gate(x)) * up(x))."""
    h = swiglu_reference(lora_linear_reference(x, gate), lora_linear_reference(x, up))
    return lora_linear_reference(h, down)


def fused_linear_cross_entropy_reference(
    hidden,
    weight,
    labels,
    bias=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    rows=None,
):
    """CE(hidden W^T + b, labels) with logits in hidden.dtype upcast to fp32 (HF's order).

    hidden (T, H), weight (V, H), labels (T,) int64; reduction "mean" (over labels != ignore_index)
    or "sum". chunk_size is accepted for signature parity and ignored: this path builds all logits.
    rows (index (k,), values (k, H)): W's rows index replaced by values (trainable token rows).
    """
    b = None if bias is None else bias.to(hidden.dtype)
    logits = F.linear(hidden, weight.to(hidden.dtype), b)
    if rows is not None:
        cols = F.linear(hidden, rows.values.to(hidden.dtype), None if b is None else b[rows.index])
        logits = logits.index_copy(-1, rows.index, cols)
    logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)

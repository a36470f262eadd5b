"""The LoRA / QLoRA linear as one autograd Function: y = x W^T + b + s * (drop(x) A^T) B^T.

Shapes: x (M, K) tokens x in_features, W (N, K) dense or NF4, A (r, K), B (N, r), b (N,), y (M, N).
Intermediate S = drop(x) A^T (M, r) is the only LoRA tensor that touches memory (LoRAFusion's split).

Forward, per shape (see `dispatch`):
    S  = x A^T                      torch.mm, or dropout+GEMM in one Triton pass when p > 0
    y  = x W^T + b;  y += s S B^T   cuBLAS: addmm into y, then addmm_ of the rank-r term (no temporary);
                                    W NF4 -> dequantized into the shared buffer first (`dequant_buffer`)
    or y = fused_gemm(...)          one Triton GEMM, the rank-r product added in the same fp32
                                    accumulator; NF4 decoded inside the tiles (never written to memory)
Backward (dY (M, N)); with Bs = s B (cast once, r x N):
    dS = dY Bs                      (M, r)
    dB = s dY^T S                   (N, r)   from the saved S, no recompute
    dA = dS^T drop(x)               (r, K)   torch.mm, or the Triton kernel regenerating the mask
    dx = dY W + drop'(dS A)         cuBLAS mm + addmm_ (or + a masked Triton pass), or one fused GEMM
    db = sum_m dY                   only when the bias is trainable (never for LoRA bases)
GEMM launches: forward 3 on the cuBLAS path (x A^T, x W^T, the addmm_ of S B^T) or 2 fused; backward 5
(dS, dB, dA, dY W, the addmm_ of dS A) or 4 fused; one fewer with FUSED_DS_DB, where one Triton kernel
forms dS and dB from a single read of dY (LoRAFusion's third fusion; off until measured faster). Every
rank-r product is bracketed small-first: no intermediate of size (M, K), (M, N) or (N, K) besides y, dx.

Saved for backward: x and S (M x r, 0.4% of x at r = 16 and K = 4096). Not saved: the dequantized W,
the dropout mask or the dropped x (the mask is a counter hash of (seed, element), regenerated), any
(M, N) temporary.

Dtype policy: the compute dtype is x.dtype (bf16/fp16/fp32); fp32 accumulation everywhere. The LoRA
matrices stay fp32 masters: each call casts A and B (r x (K + N), ~260 KB at 4096/r=16) to the compute
dtype, the gradients come back cast to the masters' dtype, and the optimizer steps the fp32 masters.
(peft instead runs the LoRA branch in fp32; for fp32 models the two are the same math. Dropout masks
come from our hash, not torch's RNG.)
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from . import _runtime
from .nf4_dequant import nf4_absmax, nf4_dequantize
from .reference import LoRAWeights, lora_linear_reference

if _runtime.HAS_TRITON:
    from .lora_gemm import Dropout, dropout_down, dropout_grad_a, fused_gemm, grad_s_b

# Largest token count M that takes the fused Triton GEMM (NF4 decoded inside the tiles); above it,
# dequantize + cuBLAS. The floors suggested a crossover near 256 tokens at 4096 x 4096, but the first
# version of the in-tile kernel measured 12-60x slower than dequantize + cuBLAS on an H200 (2048 tokens,
# benchmarks/NOTES.md 2026-11-28), so it is off by default until a faster version measures ahead;
# benchmarks/bench_kernels.py --ops lora_nf4_sweep finds the crossover, and the env vars override.
NF4_FUSED_MAX_M = int(os.environ.get("LORAFUSE_NF4_FUSED_MAX_M", "0"))
DENSE_FUSED_MAX_M = int(os.environ.get("LORAFUSE_DENSE_FUSED_MAX_M", "0"))
# dS and dB from one read of dY (lora_gemm.grad_s_b) instead of two skinny cuBLAS GEMMs. It saves one
# M x N read of dY (~5 us at 2048 x 4096 bf16) and costs two small partial-sum reductions: off until
# the benchmark shows it wins on the card.
FUSED_DS_DB = os.environ.get("LORAFUSE_FUSED_DS_DB", "0") == "1"


def dispatch(m: int, is_nf4: bool) -> str:
    """"fused" (one Triton GEMM) or "cublas" (dequantize-to-buffer + torch.matmul) for m tokens."""
    return "fused" if m <= (NF4_FUSED_MAX_M if is_nf4 else DENSE_FUSED_MAX_M) else "cublas"


class Operands:
    """One LoRAWeights in the compute dtype for one forward or backward call."""

    def __init__(self, lw: LoRAWeights, dtype: torch.dtype):
        self.lw, self.dtype = lw, dtype
        self.bias = None if lw.bias is None else lw.bias.to(dtype)
        self.drop = Dropout(lw.dropout_p, lw.seed) if lw.has_lora and lw.dropout_p > 0 else None

    @functools.cached_property
    def a(self) -> torch.Tensor | None:
        """A (r, K) in the compute dtype, cast on first use (the fp32 master is what trains)."""
        return self.lw.lora_A.to(self.dtype) if self.lw.has_lora else None

    @functools.cached_property
    def b(self) -> torch.Tensor | None:
        return self.lw.lora_B.to(self.dtype) if self.lw.has_lora else None

    def base(self, m: int) -> dict:
        """fused_gemm's weight arguments when m tokens take the fused path, else {}."""
        if dispatch(m, self.lw.is_nf4) != "fused":
            return {}
        if self.lw.is_nf4:
            return {"w_nf4": self.lw.weight, "nf4_absmax": nf4_absmax(self.lw.weight)}
        return {"w": self.dense()}

    def dense(self) -> torch.Tensor:
        """W in the compute dtype (for NF4: the shared buffer, valid until the next dequantize)."""
        if self.lw.is_nf4:
            w = self.lw.weight
            return nf4_dequantize(w, self.dtype, out=dequant_buffer(w.packed.device, self.dtype, w.shape.numel()))
        return self.lw.weight.to(self.dtype)


_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The one per-(device, dtype) dequantization buffer, grown to `numel` elements if smaller (flat).

    Shared by every NF4 projection here and by the q|k|v group (lora_group.py), so QLoRA adds one dense
    weight (or one group) to peak memory. Reused in stream order: a caller finishes its GEMMs on one
    dequantized weight before the next dequantize (every user does: dequantize, matmul, next).
    """
    buf = _BUFFERS.get((device, dtype))
    if buf is None or buf.numel() < numel:
        _BUFFERS.pop((device, dtype), None)  # free the old one before allocating the larger one
        buf = torch.empty(numel, dtype=dtype, device=device)
        _BUFFERS[(device, dtype)] = buf
    return buf


def lora_down(x: torch.Tensor, ops: Operands) -> torch.Tensor | None:
    """S = drop(x) A^T (M, r), or None without LoRA."""
    if ops.a is None:
        return None
    if ops.drop is not None:
        return dropout_down(x, ops.a, ops.drop)
    return torch.mm(x, ops.a.t())


def lora_forward(x: torch.Tensor, ops: Operands):
    """(y, S) for x (M, K) contiguous in the compute dtype."""
    lw = ops.lw
    s = lora_down(x, ops)
    y = torch.empty(x.shape[0], lw.out_features, dtype=ops.dtype, device=x.device)
    fused = ops.base(x.shape[0])
    if fused:
        lora = {} if s is None else {"s": s, "rhs": ops.b.t(), "l_scale": lw.scaling}
        fused_gemm(y, x, transpose_w=True, bias=ops.bias, **fused, **lora)
        return y, s
    w = ops.dense()
    if ops.bias is not None:
        torch.addmm(ops.bias, x, w.t(), out=y)
    else:
        torch.mm(x, w.t(), out=y)
    if s is not None:
        y.addmm_(s, ops.b.t(), alpha=lw.scaling)
    return y, s


def lora_backward(dy: torch.Tensor, x: torch.Tensor, s: torch.Tensor | None, ops: Operands,
                  need_dx: bool = True, dx: torch.Tensor | None = None, accumulate: bool = False):
    """(dx, dA, dB, dbias) for dy (M, N); dx is written into `dx` (added to it if `accumulate`)."""
    ds, d_b = lora_grad_s_b(dy, s, ops)
    if need_dx:
        dx = lora_input_grad(dy, ds, ops, dx, accumulate)
    return dx, lora_grad_a(ds, x, ops), d_b, bias_grad(dy, ops)


def lora_grad_s_b(dy: torch.Tensor, s: torch.Tensor | None, ops: Operands):
    """(dS, dB): dS = dY (s B) (M, r) in the compute dtype, dB = s dY^T S in the masters' dtype."""
    lw = ops.lw
    if not lw.has_lora:
        return None, None
    b_scaled = (lw.lora_B.float() * lw.scaling).to(ops.dtype)
    if FUSED_DS_DB:
        ds, d_b = grad_s_b(dy, s, b_scaled, lw.scaling)
        return ds, d_b.to(lw.lora_B.dtype)
    ds = torch.mm(dy, b_scaled)
    d_b = torch.mm(dy.t(), s).to(lw.lora_B.dtype).mul_(lw.scaling)
    return ds, d_b


def lora_grad_a(ds: torch.Tensor | None, x: torch.Tensor, ops: Operands):
    """dA = dS^T drop(x) (r, K) in the masters' dtype."""
    if ds is None:
        return None
    d_a = dropout_grad_a(ds, x, ops.drop) if ops.drop is not None else torch.mm(ds.t(), x)
    return d_a.to(ops.lw.lora_A.dtype)


def bias_grad(dy: torch.Tensor, ops: Operands):
    bias = ops.lw.bias
    if bias is None or not bias.requires_grad:
        return None
    return dy.sum(0, dtype=torch.float32).to(bias.dtype)


def lora_input_grad(dy, ds, ops: Operands, dx=None, accumulate: bool = False) -> torch.Tensor:
    """dx (+)= dY W + drop'(dS A)."""
    m = dy.shape[0]
    if dx is None:
        dx = torch.empty(m, ops.lw.weight.shape[1], dtype=ops.dtype, device=dy.device)
    fused = ops.base(m)
    if fused:
        lora = {} if ds is None else {"s": ds, "rhs": ops.a, "drop": ops.drop}
        return fused_gemm(dx, dy, transpose_w=False, accumulate=accumulate, **fused, **lora)
    w = ops.dense()
    if accumulate:
        dx.addmm_(dy, w)
    else:
        torch.mm(dy, w, out=dx)
    return add_lora_input_grad(dx, ds, ops)


def add_lora_input_grad(dx: torch.Tensor, ds: torch.Tensor | None, ops: Operands) -> torch.Tensor:
    """dx += drop'(dS A) (nothing without LoRA)."""
    if ds is not None and ops.drop is not None:
        fused_gemm(dx, s=ds, rhs=ops.a, drop=ops.drop, accumulate=True)
    elif ds is not None:
        dx.addmm_(ds, ops.a)
    return dx


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (drop(x) A^T) B^T on 2-D x; saves x and S.

    Backward derivation (G = dL/dy, S = drop(x) A^T, y = x W^T + b + s S B^T):
        dL/dB = s G^T S;  dL/dS = s G B;  dL/dA = (dL/dS)^T drop(x)   (S = drop(x) A^T)
        dL/dx = G W + drop'((dL/dS) A),  drop'(z) = z * keep / (1 - p), the dropout's own transpose
        dL/db = sum over rows of G;  W is frozen (no gradient).
    """

    @staticmethod
    @_runtime.autocast_off
    def forward(ctx, x, weight, bias, lora_A, lora_B, lw):
        ops = Operands(lw, x.dtype)
        y, s = lora_forward(x, ops)
        ctx.lw = lw
        ctx.save_for_backward(x, s)
        return y

    @staticmethod
    @_runtime.autocast_off
    def backward(ctx, dy):
        x, s = ctx.saved_tensors
        ops = Operands(ctx.lw, x.dtype)
        dx, d_a, d_b, d_bias = lora_backward(dy.contiguous(), x, s, ops, ctx.needs_input_grad[0])
        return dx, None, d_bias, d_a, d_b, None


def with_seed(lw: LoRAWeights) -> LoRAWeights:
    """Draw the dropout seed from torch's CPU generator when the caller did not (seeded, checkpoint-safe)."""
    if lw.has_lora and lw.dropout_p > 0 and lw.seed is None:
        return dataclasses.replace(lw, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    return lw


def lora_linear(x: torch.Tensor, lw: LoRAWeights) -> torch.Tensor:
    """y (..., out) = x W^T + b + s * (drop(x) A^T) B^T; the reference on CPU or for a trainable W."""
    lw = with_seed(lw)
    trainable_w = isinstance(lw.weight, torch.Tensor) and lw.weight.requires_grad
    if not _runtime.use_triton(x) or trainable_w:
        return lora_linear_reference(x, lw)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    dense = lw.weight if isinstance(lw.weight, torch.Tensor) else None
    y = LoRALinearFunction.apply(x2, dense, lw.bias, lw.lora_A, lw.lora_B, lw)
    return y.view(*x.shape[:-1], y.shape[-1])

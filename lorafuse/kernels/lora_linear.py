"""The LoRA / QLoRA linear as one autograd Function: y = x W^T + b + s * (drop(x) A^T) B^T.

Shapes: x (M, K) tokens x in_features, W (N, K) dense or NF4, A (r, K), B (N, r), b (N,), y (M, N).
Intermediate S = drop(x) A^T (M, r) is the only LoRA tensor that touches memory (LoRAFusion's split).

Forward:
    S  = x A^T                      torch.mm, or dropout+GEMM in one Triton pass when p > 0
    y  = x W^T + b;  y += S Bs^T    cuBLAS: addmm into y, then addmm_ of the rank-r term (no temporary);
                                    W NF4 -> dequantized into the shared buffer first (`dequant_buffer`)
    opts.fp8 (fp8.py): x W^T in e4m3 with row-wise scales (NF4 decoded straight to e4m3, the same shared
                                    buffer), and for NF4 the backward's dY W too; the rank-r terms stay bf16
Bs = s B (N x r) in the compute dtype (one kernel: fp32 product, one rounding). Backward (dY (M, N)):
    dS = dY Bs                      (M, r)
    dB = s dY^T S                   (N, r)   from the saved S, no recompute; s applied in the GEMM (alpha)
    dA = dS^T drop(x)               (r, K)   torch.mm, or the Triton kernel regenerating the mask
    dx = dY W + drop'(dS A)         cuBLAS mm + addmm_ (+ a masked Triton pass with dropout)
    db = sum_m dY                   only when the bias is trainable (never for LoRA bases)
GEMM launches: forward 3 (x A^T, x W^T, the addmm_ of S B^T); backward 5 (dS, dB, dA, dY W, the addmm_ of
dS A), one fewer with opts.fused_ds_db, where one Triton kernel forms dS and dB from a single read of dY
(LoRAFusion's third fusion; an experimental switch until measured faster). Every rank-r product is bracketed
small-first: no intermediate of size (M, K), (M, N) or (N, K) besides y, dx. NF4 weights are dequantized into
one shared buffer and multiplied by cuBLAS: a Triton GEMM decoding NF4 inside its tiles measured 12-60x slower
on an H200 at 2048 tokens, so there is none.

Saved for backward: x and S (M x r, 0.4% of x at r = 16 and K = 4096), and the forward's casts of A and Bs
(r x (K + N) each in the compute dtype: ~260 KB at 4096 / r = 16), so the backward launches no cast (four
fewer small kernels per projection: ~900 a step at Llama-2-7B). Not saved: the dequantized W,
the dropout mask or the dropped x (the mask is a counter hash of (seed, element), regenerated), any
(M, N) temporary.

Dtype policy: the compute dtype is x.dtype (bf16/fp16/fp32); fp32 accumulation everywhere. The LoRA
matrices stay fp32 masters: each forward (and checkpoint recompute) casts A and s B to the compute
dtype, the gradients come back cast to the masters' dtype, and the optimizer steps the fp32 masters.
(peft instead runs the LoRA branch in fp32; for fp32 models the two are the same math. Dropout masks
come from our hash, not torch's RNG.)
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import _runtime, fp8
from .nf4_dequant import nf4_dequantize
from .reference import LoRAWeights, lora_linear_reference

if _runtime.HAS_TRITON:
    from .lora_gemm import Dropout, dropout_down, dropout_grad_a, masked_lora_product
    from .lora_grad_sb import grad_s_b


def dequant_rows(rows: int, numel: int, step: int, elem_bytes: int, cap: int) -> int:
    """Rows per part when a (rows, numel / rows) weight is dequantized under the cap (bytes; 0: none): a multiple of
    `step` (the NF4 cut alignment), `rows` itself when it fits or there is no cap."""
    if not cap or numel * elem_bytes <= cap:
        return rows
    parts = -(-numel * elem_bytes // cap)  # ceil
    per_part = -(-rows // parts)
    return min(rows, -(-per_part // step) * step)  # rounded up to the cut alignment


class Operands:
    """One LoRAWeights in the compute dtype for one forward or backward call.

    `casts`: (A, s B) in the compute dtype as a forward made them (`casts()`, saved for backward), so the
    backward launches no cast of its own. Under checkpointing the forward's saved casts are dropped and the
    recompute makes them again, right before the layer's backward."""

    def __init__(self, lw: LoRAWeights, dtype: torch.dtype, casts: tuple | None = None):
        self.lw, self.dtype = lw, dtype
        self.bias = None if lw.bias is None else lw.bias.to(dtype)
        self.drop = Dropout(lw.dropout_p, lw.seed) if lw.has_lora and lw.dropout_p > 0 else None
        if casts is not None:
            self.__dict__["a"], self.__dict__["b_scaled"] = casts  # the cached properties' slots

    @functools.cached_property
    def a(self) -> torch.Tensor | None:
        """A (r, K) in the compute dtype, cast on first use (the fp32 master is what trains)."""
        return self.lw.lora_A.to(self.dtype) if self.lw.has_lora else None

    @functools.cached_property
    def b_scaled(self) -> torch.Tensor | None:
        """s B (N, r) in the compute dtype: one kernel (the product in fp32, rounded once on the store)."""
        lw = self.lw
        if not lw.has_lora:
            return None
        return torch.mul(
            lw.lora_B, lw.scaling, out=torch.empty(lw.lora_B.shape, dtype=self.dtype, device=lw.lora_B.device)
        )

    def casts(self) -> tuple:
        """(A, s B) in the compute dtype, for save_for_backward (None, None without LoRA)."""
        return self.a, self.b_scaled

    def dense(self) -> torch.Tensor:
        """W in the compute dtype (for NF4: the shared buffer, valid until the next dequantize)."""
        if self.lw.is_nf4:
            w = self.lw.weight
            return nf4_dequantize(w, self.dtype, out=dequant_buffer(w.packed.device, self.dtype, w.shape.numel()))
        return self.lw.weight.to(self.dtype)

    def dense_parts(self):
        """[(r0, r1, W[r0:r1] dense)] with each part dequantized on demand into the shared buffer (valid until the
        next part's): one part unless an NF4 weight exceeds opts.dequant_cap_bytes. A generator: each part is made
        after the caller's GEMMs on the previous one were queued (same stream, so the reuse is ordered)."""
        w = self.lw.weight
        if not self.lw.is_nf4:
            yield 0, w.shape[0], self.dense()
            return
        cap = self.lw.opts.dequant_cap_bytes
        rows = dequant_rows(w.shape[0], w.numel, w.row_alignment(), torch.finfo(self.dtype).bits // 8, cap)
        for r0 in range(0, w.shape[0], rows):
            part = w.rows(r0, min(w.shape[0], r0 + rows)) if rows < w.shape[0] else w
            yield (
                r0,
                r0 + part.shape[0],
                nf4_dequantize(part, self.dtype, out=dequant_buffer(w.packed.device, self.dtype, part.numel)),
            )

    def fp8_parts(self, transposed: bool = False):
        """[(r0, r1, W8[r0:r1] (e4m3), s_w[r0:r1] (fp32))] for the FP8 forward (fp8.py), each part made on demand
        into the shared buffer as in `dense_parts` (1 byte a weight, so the cap allows twice the rows). `transposed`
        (NF4 only, the FP8 backward): each part as W8[r0:r1]^T, (K, r1 - r0) row-major."""
        w = self.lw.weight
        rows_total = w.shape[0]
        if transposed and not self.lw.is_nf4:
            raise ValueError("the FP8 backward decodes NF4 weights only")
        if not self.lw.is_nf4:  # a 16-bit weight: quantized row by row on each use
            dense = self.dense()
            w8, sw = fp8.quantize_rows(
                dense, out=dequant_buffer(dense.device, fp8.E4M3, dense.numel()).view(dense.shape)
            )
            yield 0, rows_total, w8, sw.view(-1)
            return
        scales = fp8.nf4_row_scales(w)
        rows = dequant_rows(rows_total, w.numel, w.row_alignment(), 1, self.lw.opts.dequant_cap_bytes)
        decode = fp8.nf4_to_fp8_t if transposed else fp8.nf4_to_fp8
        for r0 in range(0, rows_total, rows):
            r1 = min(rows_total, r0 + rows)
            part = w.rows(r0, r1) if rows < rows_total else w
            yield (
                r0,
                r1,
                decode(part, dequant_buffer(w.packed.device, fp8.E4M3, part.numel), scales[r0:r1]),
                scales[r0:r1],
            )


def fp8_input(x: torch.Tensor, lw: LoRAWeights):
    """(x8, s_x) for x (M, K) when lw's forward takes FP8 GEMMs (fp8.applies), else None. Callers whose projections
    share x (q, k, v; gate, up) quantize it once and pass it to each `lora_forward`."""
    if fp8.applies(x, lw):
        return fp8.quantize_rows(x)
    return None


_BUFFERS: dict[torch.device, torch.Tensor] = {}  # bytes


def dequant_buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The one per-device dequantization buffer as `numel` elements of `dtype` (flat), grown if smaller.

    Shared by every NF4 projection and by the FP8 forward's 1-byte weights (fp8.py), so QLoRA adds one dense
    weight to peak memory: the largest request in bytes.
    Reused in stream order: a caller finishes its GEMMs on one dequantized weight before the next dequantize
    (every user does: dequantize, matmul, next).
    """
    nbytes = numel * dtype.itemsize
    buf = _BUFFERS.get(device)
    if buf is None or buf.numel() < nbytes:
        _BUFFERS.pop(device, None)  # free the old one before allocating the larger one
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _BUFFERS[device] = buf
    return buf[:nbytes].view(dtype)


def lora_down(x: torch.Tensor, ops: Operands) -> torch.Tensor | None:
    """S = drop(x) A^T (M, r), or None without LoRA."""
    if ops.a is None:
        return None
    if ops.drop is not None:
        return dropout_down(x, ops.a, ops.drop)
    return torch.mm(x, ops.a.t())


def lora_forward(x: torch.Tensor, ops: Operands, xq: tuple | None = None):
    """(y, S) for x (M, K) contiguous in the compute dtype; `xq`: x already quantized for FP8 (`fp8_input`)."""
    lw = ops.lw
    s = lora_down(x, ops)
    y = torch.empty(x.shape[0], lw.out_features, dtype=ops.dtype, device=x.device)
    xq = (xq or fp8.quantize_rows(x)) if fp8.applies(x, lw) else None
    fast_k = lw.opts.fp8_fast_accum_max_k
    parts = ops.dense_parts() if xq is None else ops.fp8_parts()
    for r0, r1, w, *sw in parts:  # one part unless the weight exceeds the dequantization cap
        out = y if r1 - r0 == y.shape[1] else y[:, r0:r1]  # a column block: cuBLAS writes it with ld = N
        if sw:  # FP8: (x8 W8^T) s_x s_w^T (+ b) in bf16; a column block via a copy (_scaled_mm writes whole tensors)
            bias = None if ops.bias is None else ops.bias[r0:r1]
            if out is y:
                fp8.scaled_mm(*xq, w, sw[0], bias, out=y, fast_accum_max_k=fast_k)
            else:
                out.copy_(fp8.scaled_mm(*xq, w, sw[0], bias, fast_accum_max_k=fast_k))
        elif ops.bias is not None:
            torch.addmm(ops.bias[r0:r1], x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)
    if s is not None:
        y.addmm_(s, ops.b_scaled.t())
    return y, s


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor | None,
    ops: Operands,
    need_dx: bool = True,
    dx: torch.Tensor | None = None,
    accumulate: bool = False,
):
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
    b_scaled = ops.b_scaled
    if lw.opts.fused_ds_db:
        ds, d_b = grad_s_b(dy, s, b_scaled, lw.scaling)
        return ds, d_b.to(lw.lora_B.dtype)
    ds = torch.mm(dy, b_scaled)
    return ds, weight_grad(dy.t(), s, lw.lora_B.dtype, lw.scaling)


def weight_grad(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
    """alpha a b for a LoRA master of `dtype`: on CUDA the GEMM writes its fp32 accumulator out directly
    (`out_dtype`, no cast kernel, no rounding to the compute dtype first); elsewhere the product in the compute
    dtype, scaled in the GEMM (alpha), then cast."""
    if dtype == torch.float32 and a.dtype != dtype and a.is_cuda and _runtime.gemm_fp32_out(a.device):
        if alpha == 1.0:
            return torch.mm(a, b, out_dtype=dtype)
        out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
        return torch.addmm(out, a, b, out_dtype=dtype, beta=0, alpha=alpha, out=out)
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return torch.addmm(out, a, b, beta=0, alpha=alpha, out=out).to(dtype)


def lora_grad_a(ds: torch.Tensor | None, x: torch.Tensor, ops: Operands):
    """dA = dS^T drop(x) (r, K) in the masters' dtype."""
    if ds is None:
        return None
    if ops.drop is not None:
        return dropout_grad_a(ds, x, ops.drop).to(ops.lw.lora_A.dtype)  # fp32 from the kernel
    return weight_grad(ds.t(), x, ops.lw.lora_A.dtype)


def bias_grad(dy: torch.Tensor, ops: Operands):
    bias = ops.lw.bias
    if bias is None or not bias.requires_grad:
        return None
    return dy.sum(0, dtype=torch.float32).to(bias.dtype)


def lora_input_grad(dy, ds, ops: Operands, dx=None, accumulate: bool = False) -> torch.Tensor:
    """dx (+)= dY W + drop'(dS A)."""
    if dx is None:
        dx = torch.empty(dy.shape[0], ops.lw.weight.shape[1], dtype=ops.dtype, device=dy.device)
    # dY W summed over W's row parts (one unless over the cap); in FP8 (opts.fp8, NF4) from W8^T and s_w
    parts = ops.fp8_parts(transposed=True) if fp8.backward_applies(dy, ops.lw) else ops.dense_parts()
    fast_k = ops.lw.opts.fp8_fast_accum_max_k
    for r0, r1, w, *sw in parts:
        g = dy if r1 - r0 == dy.shape[1] else dy[:, r0:r1]
        if sw and (accumulate or r0 > 0):  # _scaled_mm cannot accumulate: an add of the part
            dx.add_(fp8.grad_input(g, w, sw[0], fast_accum_max_k=fast_k))
        elif sw:
            fp8.grad_input(g, w, sw[0], out=dx, fast_accum_max_k=fast_k)
        elif accumulate or r0 > 0:
            dx.addmm_(g, w)
        else:
            torch.mm(g, w, out=dx)
    return add_lora_input_grad(dx, ds, ops)


def add_lora_input_grad(dx: torch.Tensor, ds: torch.Tensor | None, ops: Operands) -> torch.Tensor:
    """dx += drop'(dS A) (nothing without LoRA)."""
    if ds is not None and ops.drop is not None:
        masked_lora_product(dx, ds, ops.a, ops.drop)
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
    def forward(ctx, x, weight, bias, lora_A, lora_B, lw, xq=None):
        ops = Operands(lw, x.dtype)
        y, s = lora_forward(x, ops, xq)
        ctx.lw = lw
        ctx.save_for_backward(x, s, *ops.casts())
        return y

    @staticmethod
    @_runtime.autocast_off
    def backward(ctx, dy):
        x, s, *casts = ctx.saved_tensors
        ops = Operands(ctx.lw, x.dtype, casts)
        dx, d_a, d_b, d_bias = lora_backward(dy.contiguous(), x, s, ops, ctx.needs_input_grad[0])
        return dx, None, d_bias, d_a, d_b, None, None


def with_seed(lw: LoRAWeights) -> LoRAWeights:
    """Draw the dropout seed from torch's CPU generator when the caller did not (seeded, checkpoint-safe)."""
    if lw.has_lora and lw.dropout_p > 0 and lw.seed is None:
        return dataclasses.replace(lw, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    return lw


def lora_linear(x: torch.Tensor, lw: LoRAWeights, xq: tuple | None = None) -> torch.Tensor:
    """y (..., out) = x W^T + b + s * (drop(x) A^T) B^T; the reference on CPU or for a trainable W. `xq`: the
    rows of x quantized for the FP8 forward (`fp8_input`), when the caller shares them between projections."""
    lw = with_seed(lw)
    trainable_w = isinstance(lw.weight, torch.Tensor) and lw.weight.requires_grad
    if not _runtime.use_triton(x) or trainable_w:
        return lora_linear_reference(x, lw)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    dense = lw.weight if isinstance(lw.weight, torch.Tensor) else None
    y = LoRALinearFunction.apply(x2, dense, lw.bias, lw.lora_A, lw.lora_B, lw, xq)
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_linears(x: torch.Tensor, specs) -> tuple[torch.Tensor, ...]:
    """(lora_linear(x, lw) for lw in specs): projections of one input (q, k, v). With FP8 the rows of x are quantized
    once for all of them. Seeds are drawn in order, as separate calls would draw them."""
    specs = tuple(with_seed(lw) for lw in specs)
    xq = fp8_input(x.reshape(-1, x.shape[-1]), specs[0]) if _runtime.use_triton(x) else None
    return tuple(lora_linear(x, lw, xq) for lw in specs)

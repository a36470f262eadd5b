"""FP8 (e4m3) base-weight GEMMs for the forward, the checkpoint recompute and the backward's dX: `train.fp8`, opt-in.

Math, for a projection y = x W^T + b with x (M, K) in bf16 and W (N, K) frozen (NF4 or bf16):
    s_x[m] = max_k |x[m, k]| / 448,  x8 = e4m3(x / s_x)       one scale per token (row), a Triton pass over x
    s_w[n] = max_k |W[n, k]| / 448,  W8 = e4m3(W / s_w)       one scale per output row
    y ~= (x8 W8^T) * s_x s_w^T + b                            torch._scaled_mm, fp32 accumulation, bf16 out
For NF4, max_k |W[n, k]| is at most the largest block scale of row n (the NF4 code's largest magnitude is 1), so
s_w comes from the block scales alone, once per weight (cached on the NF4Weight: 4 bytes a row), and the
dequantization kernel writes W8 directly (nf4_dequant.py, ROW_SCALE): 1 byte a weight instead of 2. A bf16
weight is quantized like x, row by row, on each use.

The backward's dx = dY W, for NF4 weights:
    dx ~= q(dY diag(s_w)) W8 * s_dY      W's row scales ride on dY's columns (dY s_w quantized row by row), and W8
                                         is decoded transposed, (K, N) row-major (`nf4_to_fp8_t`), as the GEMM needs
What stays in bf16: every LoRA product and gradient (dA and dB read dY and S, not dx), a bf16 base's dx, attention,
the loss. The LoRA gradients see FP8 through the forward's activations and the dx of the layers above.

Why: on an H200 (benchmarks/fp8_probe.py, 2048 tokens, the 7B projection shapes) _scaled_mm with row-wise scales
took 0.48-0.62x the bf16 GEMM's time; the forward and the recompute hold ~60% of a QLoRA step's base-GEMM FLOPs, dx
the rest. Measured on one H200 (benchmarks/NOTES.md): a Llama-2-7B QLoRA step at 4 x 512 tokens 0.161 s in bf16,
0.136 s with the forward in FP8, 0.119 s with dx too.
Cost: each output carries ~3.7% relative error against the exact product (bf16: ~0.17%), measured there on random
data; e4m3 keeps 3 mantissa bits. For QLoRA that is small beside NF4's own rounding of the weights. The training
loss is compared against the bf16 path by benchmarks/loss_curves.py (its fast-fp8fwd-graphs and fast-fp8bwd-graphs
variants), the LoRA gradients against fp32 by benchmarks/fp8_grads.py.

Needs: an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell), bf16 compute, K and N multiples
of 16 (else that projection stays bf16). Whether a projection runs in FP8 is its operands' `opts.fp8`
(lorafuse.options.KernelOptions, from train.fp8). On CPU tensors the reference (`quantize_rows_reference`, and
`torch._scaled_mm`, which PyTorch also runs on the CPU) gives the same math, so the dispatch is tested without a GPU.

The Triton interpreter rounds to fp8 wrongly where a value rounds up across a power of two (31.7 -> 16, seen with
triton 3.6), so the kernels' fp8 stores are checked on the GPU only (tests marked gpu).
"""

from __future__ import annotations

import dataclasses

import torch

from . import _runtime

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_TINY = 1e-12  # a zero row gets this amax: scale > 0, codes 0
# The transposed decode's tile: 128 rows of W x 128 weights along K (whole quantization blocks), so each k's store is
# 128 contiguous bytes (a tile that gathered every weight's byte and scale on its own made the 7B step 21% slower).
T_TILE_ROWS, T_TILE_COLS, T_WARPS = 128, 128, 4

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_rows_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        col_scale_ptr,
        K,
        x_stride,
        q_stride,
        TINY: tl.constexpr,
        OUT_MAX: tl.constexpr,
        BLOCK: tl.constexpr,
        COL_SCALE: tl.constexpr = False,
    ):
        # one program per row: pass 1 the row's absolute max, pass 2 (the row again, mostly from L2) the codes;
        # COL_SCALE: the row times col_scale (fp32, per column) first
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        q_row = q_ptr + row * q_stride
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            if COL_SCALE:
                v = v * tl.load(col_scale_ptr + offs, mask=offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.maximum(tl.max(amax, axis=0), TINY)
        tl.store(scale_ptr + row, tl.math.div_rn(m, OUT_MAX))  # IEEE divisions: bit for bit the reference
        inv = tl.math.div_rn(OUT_MAX + tl.zeros_like(m), m)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            if COL_SCALE:
                v = v * tl.load(col_scale_ptr + offs, mask=offs < K, other=0.0)
            v = tl.minimum(tl.maximum(v * inv, -OUT_MAX), OUT_MAX)
            tl.store(q_row + offs, v.to(q_ptr.dtype.element_ty), mask=offs < K)

    @triton.jit
    def _nf4_t_kernel(
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        code_ptr,
        row_scale_ptr,
        out_ptr,
        rows,
        blocks_per_row,
        offset,
        BLOCKSIZE: tl.constexpr,
        NESTED_LOG2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        OUT_MAX: tl.constexpr,
        BR: tl.constexpr,
        NB: tl.constexpr,
    ):
        # A tile of W: BR rows n x NB quantization blocks along k, read as (BR, NB, BLOCKSIZE / 2) packed bytes
        # (each block's bytes contiguous: coalesced loads, one scale per (row, block)), decoded as nf4_dequant's
        # ROW_SCALE launch does (the same fp32 operations in the same order), stored transposed into out (K, N):
        # out[k, n] = W[n, k] / s_w[n], each k's BR bytes contiguous.
        BC: tl.constexpr = NB * BLOCKSIZE
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        b = tl.program_id(1) * NB + tl.arange(0, NB)
        r_ok = r < rows
        ok = r_ok[:, None] & (b < blocks_per_row)[None, :]
        blk = r[:, None].to(tl.int64) * blocks_per_row + b[None, :]
        byte = blk[:, :, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, None, :]
        packed = tl.load(packed_ptr + byte, mask=ok[:, :, None], other=0).to(tl.int32)
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + (blk >> NESTED_LOG2), mask=ok, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
        row_scale = tl.load(row_scale_ptr + r, mask=r_ok, other=1.0)
        scale = tl.math.div_rn(scale, row_scale[:, None])[:, :, None]
        hi = tl.load(code_ptr + (packed >> 4)) * scale
        lo = tl.load(code_ptr + (packed & 15)) * scale
        v = tl.reshape(tl.interleave(hi, lo), (BR, BC))
        v = tl.minimum(tl.maximum(v, -OUT_MAX), OUT_MAX)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        c_ok = c < blocks_per_row * BLOCKSIZE
        out = out_ptr + c[:, None].to(tl.int64) * rows + r[None, :]
        tl.store(out, tl.trans(v.to(out_ptr.dtype.element_ty)), mask=c_ok[:, None] & r_ok[None, :])


def applies(x: torch.Tensor, lw) -> bool:
    """True when lw's projection of x (M, K) takes the FP8 forward: `lw.opts.fp8` on, bf16, and K and N multiples of
    16 (_scaled_mm's requirement; it writes bf16 with row-wise scales)."""
    return lw.opts.fp8 and x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0 and lw.out_features % 16 == 0


def quantize_rows_reference(x: torch.Tensor, out: torch.Tensor | None = None, col_scale: torch.Tensor | None = None):
    """(x8 (M, K) e4m3, s (M, 1) fp32) with x ~= x8 * s (x times `col_scale` per column first, if given), row by row,
    in PyTorch (the CPU path)."""
    xf = x.float() if col_scale is None else x.float() * col_scale.view(1, -1)
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
    inv = torch.full_like(amax, E4M3_MAX) / amax  # a true division (a scalar / tensor is a reciprocal times it)
    codes = (xf * inv).clamp(-E4M3_MAX, E4M3_MAX)
    scale = amax / torch.full_like(amax, E4M3_MAX)  # true divisions on CUDA too (there tensor / scalar multiplies by
    if out is None:  # the reciprocal), as the kernel's div_rn
        return codes.to(E4M3), scale
    out.copy_(codes)
    return out, scale


def quantize_rows(x: torch.Tensor, out: torch.Tensor | None = None, col_scale: torch.Tensor | None = None):
    """(x8, s): x (M, K) 16-bit, unit stride along K (times `col_scale` (K,) fp32 per column, if given) -> e4m3 codes
    (into `out` if given) and fp32 row scales."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"quantize_rows takes a 2-D tensor with unit stride along its rows, got {tuple(x.shape)} "
            f"strides {x.stride()}"
        )
    if not x.is_cuda or not _runtime.HAS_TRITON:
        return quantize_rows_reference(x, out, col_scale)
    return _quantize_rows_kernel(x, out, col_scale)


def _quantize_rows_kernel(x: torch.Tensor, out: torch.Tensor | None = None, col_scale: torch.Tensor | None = None):
    """The Triton launch of `quantize_rows` (on CPU tensors under the interpreter, into an fp32 `out` in tests)."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=E4M3, device=x.device) if out is None else out
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = min(2048, triton.next_power_of_2(k))
    cs = scale if col_scale is None else col_scale.contiguous()  # unused pointer without COL_SCALE
    _quant_rows_kernel[(m,)](
        x,
        q,
        scale,
        cs,
        k,
        x.stride(0),
        q.stride(0),
        TINY=_TINY,
        OUT_MAX=E4M3_MAX,
        BLOCK=block,
        COL_SCALE=col_scale is not None,
        num_warps=4 if block <= 1024 else 8,
    )
    return q, scale


def nf4_row_scales(w) -> torch.Tensor:
    """s_w (N,) fp32 of a 2-D NF4Weight: its rows' largest block scale / 448, cached on the weight (frozen)."""
    cached = getattr(w, "_fp8_row_scales", None)
    if cached is not None and cached.device == w.packed.device:
        return cached
    from .nf4_dequant import nf4_absmax

    rows, cols = int(w.shape[0]), int(w.shape[1])
    if cols % w.blocksize:
        raise ValueError(f"FP8 row scales need rows of whole NF4 blocks: {cols} columns, blocksize {w.blocksize}")
    absmax = nf4_absmax(w).view(rows, cols // w.blocksize)
    scales = (absmax.abs().amax(dim=1).clamp_min(_TINY) / E4M3_MAX).contiguous()
    w._fp8_row_scales = scales
    return scales


def nf4_to_fp8(w, out: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """W8 (N, K) e4m3 = W / s_w (row by row) from an NF4Weight into the flat e4m3 buffer `out`."""
    n = w.numel
    flat = out.reshape(-1)[:n]
    if w.packed.is_cuda and _runtime.HAS_TRITON:
        from .nf4_dequant import _launch

        _launch(w, flat, row_scale=row_scales)
    else:
        flat.copy_(nf4_scaled_reference(w, row_scales, E4M3_MAX).reshape(-1))
    return flat.view(w.shape)


def nf4_scaled_reference(w, row_scales: torch.Tensor, limit: float) -> torch.Tensor:
    """fp32 (N, K): W / s_w in the kernel's order (each block scale divided by its row's, then code * that),
    clamped to +-limit: what the dequantization kernel rounds to its output dtype under ROW_SCALE."""
    from .reference import nf4_absmax_reference

    per_row = w.shape[1] // w.blocksize
    scaled = nf4_absmax_reference(w) / row_scales.repeat_interleave(per_row)
    plain = dataclasses.replace(w, absmax=scaled, nested_absmax=None, nested_code=None, offset=None)
    return plain.dequantize(torch.float32).clamp(-limit, limit)


def nf4_to_fp8_t(w, out: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """W8^T (K, N) e4m3 row-major = (W / s_w)^T from an NF4Weight (N, K) into the flat buffer `out` (the layout the
    backward's FP8 GEMM reads as its column-major (N, K) operand). The same codes as `nf4_to_fp8`, transposed."""
    rows, cols = int(w.shape[0]), int(w.shape[1])
    flat = out.reshape(-1)[: rows * cols]
    if w.packed.is_cuda and _runtime.HAS_TRITON:
        _nf4_t_launch(w, flat, row_scales)
    else:
        flat.copy_(nf4_scaled_reference(w, row_scales, float(torch.finfo(out.dtype).max)).t().reshape(-1))
    return flat.view(cols, rows)


def _nf4_t_launch(w, flat: torch.Tensor, row_scales: torch.Tensor) -> None:
    """The Triton launch of `nf4_to_fp8_t` (on CPU tensors under the interpreter, into an fp32 `flat` in tests)."""
    from .nf4_dequant import _log2

    rows, cols = int(w.shape[0]), int(w.shape[1])
    limit = float(torch.finfo(flat.dtype).max)

    packed = w.packed.reshape(-1)
    dq = w.nested_absmax is not None
    code = w.code.to(device=packed.device, dtype=torch.float32)
    _log2(w.blocksize, "blocksize")
    if cols % w.blocksize:
        raise ValueError(f"the transposed decode needs rows of whole blocks, not {tuple(w.shape)} / {w.blocksize}")
    br, nb = T_TILE_ROWS, max(1, T_TILE_COLS // w.blocksize)
    blocks_per_row = cols // w.blocksize
    _nf4_t_kernel[(triton.cdiv(rows, br), triton.cdiv(blocks_per_row, nb))](
        packed,
        w.absmax,
        w.nested_absmax if dq else code,
        w.nested_code if dq else code,
        code,
        row_scales,
        flat,
        rows,
        blocks_per_row,
        float(w.offset) if dq else 0.0,
        BLOCKSIZE=w.blocksize,
        NESTED_LOG2=_log2(w.nested_blocksize, "nested_blocksize") if dq else 0,
        DOUBLE_QUANT=dq,
        OUT_MAX=limit,
        BR=br,
        NB=nb,
        num_warps=T_WARPS,
        enable_fp_fusion=False,
    )


_ONES: dict[tuple[torch.device, int], torch.Tensor] = {}


def grad_input(
    dy: torch.Tensor, w8t: torch.Tensor, sw: torch.Tensor, out: torch.Tensor | None = None, fast_accum_max_k: int = 0
):
    """dX (M, K) bf16 = dY W for dy (M, N) (unit stride along N), w8t = W8^T (K, N) e4m3 and sw (N,) W's row scales:
    the scales ride on dY's columns, so dY s_w is quantized row by row and the GEMM needs no scale along K."""
    d8, sd = quantize_rows(dy, col_scale=sw)
    k = w8t.shape[0]
    ones = _ONES.get((dy.device, k))
    if ones is None:
        ones = _ONES[(dy.device, k)] = torch.ones(1, k, dtype=torch.float32, device=dy.device)
    # w8t as scaled_mm's "w8": its transpose is the (N, K) operand
    return scaled_mm(d8, sd, w8t, ones, None, out, fast_accum_max_k)


def backward_applies(dy: torch.Tensor, lw) -> bool:
    """True when lw's backward dX takes the FP8 GEMM (`lw.opts.fp8`, an NF4 base, bf16, K and N multiples of 16)."""
    return (
        lw.opts.fp8
        and lw.is_nf4
        and dy.dtype == torch.bfloat16
        and int(lw.weight.shape[1]) % 16 == 0
        and lw.out_features % 16 == 0
    )


def scaled_mm(
    x8: torch.Tensor,
    sx: torch.Tensor,
    w8: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    fast_accum_max_k: int = 0,
) -> torch.Tensor:
    """(x8 W8^T) s_x s_w^T + b in bf16: x8 (M, K), w8 (N, K) e4m3 row-major, sx (M, 1), sw (N,) or (1, N) fp32.
    cuBLAS's fast accumulation where K <= `fast_accum_max_k` (KernelOptions.fp8_fast_accum_max_k)."""
    kw = {} if out is None else {"out": out}
    fast = x8.is_cuda and x8.shape[1] <= fast_accum_max_k
    return torch._scaled_mm(
        x8, w8.t(), scale_a=sx, scale_b=sw.view(1, -1), bias=bias, out_dtype=torch.bfloat16, use_fast_accum=fast, **kw
    )

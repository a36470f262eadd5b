"""NF4 dequantization: packed 4-bit codes -> a dense (out, in) weight, bit for bit NF4Weight.dequantize().

Math (bitsandbytes' layout, research/formats.md section 2): over the flattened row-major weight,
    w[i] = code[nibble(i)] * absmax[i // blocksize]          (fp32, then one cast to the output dtype)
    nibble(2k) = packed[k] >> 4,  nibble(2k + 1) = packed[k] & 15
With double quantization the block scales are themselves 8-bit codes:
    absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset   (fp32)
Shapes: packed uint8 (ceil(n/2),), absmax (n_blocks,) fp32 or uint8, nested_absmax fp32
(ceil(n_blocks/256),), nested_code fp32 (256,), code fp32 (16,). Output (out, in) in `dtype`
(default the weight's original dtype).

Bit-exactness: each program decodes BLOCK bytes (2*BLOCK weights). Blocksizes are powers of two >= 32,
so both weights of a byte share one scale. The scale is rebuilt with a separate multiply and add,
launched with `enable_fp_fusion=False` so the compiler cannot contract them into an FMA (one rounding
instead of the reference's two); the product code*absmax is a single fp32 rounding, and the cast is
round-to-nearest-even, as in torch.

No autograd: the weight is frozen. `dequantize_to_buffer` writes into one per-(device, dtype) buffer
sized to the largest weight seen, so QLoRA adds exactly one dense weight to peak memory; the buffer
is reused in stream order, so a caller must finish with one weight's GEMM before the next dequantize
(every user in this package does: dequantize, matmul, next).
"""

from __future__ import annotations

import torch

from . import _runtime
from .reference import nf4_absmax_reference, nf4_dequantize_reference

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                            n, n_bytes, offset,
                            BYTE_BLOCK_LOG2: tl.constexpr, NESTED_LOG2: tl.constexpr,
                            DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BLOCK + tl.arange(0, BLOCK)
        in_range = byte < n_bytes
        packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
        blk = byte >> BYTE_BLOCK_LOG2  # weights 2k and 2k+1 share block (2k) // blocksize
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + (blk >> NESTED_LOG2), mask=in_range,
                                                           other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)
        hi = tl.load(code_ptr + (packed >> 4)) * scale
        lo = tl.load(code_ptr + (packed & 15)) * scale
        vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
        elem = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + elem, vals, mask=elem < n)

    @triton.jit
    def _nf4_absmax_kernel(absmax_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, n_blocks, offset,
                           NESTED_LOG2: tl.constexpr, BLOCK: tl.constexpr):
        blk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = blk < n_blocks
        q = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(nested_absmax_ptr + (blk >> NESTED_LOG2), mask=in_range,
                                                       other=0.0)
        tl.store(out_ptr + blk, scale + offset, mask=in_range)


_BLOCK = 1024  # bytes per program: 2048 weights, 2-4 KiB written, enough work per program to hide latency


def _log2(v: int, what: str) -> int:
    if v < 2 or v & (v - 1):
        raise ValueError(f"NF4 {what} must be a power of two, got {v}")
    return v.bit_length() - 1


def _launch(w, out_flat: torch.Tensor) -> None:
    n = w.shape.numel()
    packed = w.packed.reshape(-1)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    dq = w.nested_absmax is not None
    code = w.code.to(device=packed.device, dtype=torch.float32)
    nested_absmax = w.nested_absmax if dq else code  # unused pointers still need a tensor
    nested_code = w.nested_code if dq else code
    grid = (triton.cdiv(packed.numel(), _BLOCK),)
    _nf4_dequant_kernel[grid](
        packed, w.absmax, nested_absmax, nested_code, code, out_flat, n, packed.numel(),
        float(w.offset) if dq else 0.0,
        BYTE_BLOCK_LOG2=_log2(w.blocksize, "blocksize") - 1,
        NESTED_LOG2=_log2(w.nested_blocksize, "nested_blocksize") if dq else 0,
        DOUBLE_QUANT=dq, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False,
    )


def nf4_dequantize(w, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (out, in) weight from an NF4Weight; into `out` (any contiguous tensor with >= n elements) if given."""
    dtype = dtype or w.dtype
    if not _runtime.use_triton(w.packed):
        return nf4_dequantize_reference(w, dtype, out)
    n = w.shape.numel()
    if out is None:
        out = torch.empty(n, dtype=dtype, device=w.packed.device)
    if out.dtype != dtype or not out.is_contiguous() or out.numel() < n:
        raise ValueError(f"out must be a contiguous {dtype} tensor with >= {n} elements")
    flat = out.reshape(-1)[:n]
    _launch(w, flat)
    return flat.view(w.shape)


def nf4_absmax(w) -> torch.Tensor:
    """fp32 (n_blocks,) block scales, decoded through the double quantization (what the fused GEMM reads)."""
    if w.nested_absmax is None:
        return w.absmax.float()
    if not _runtime.use_triton(w.packed):
        return nf4_absmax_reference(w)
    n_blocks = w.absmax.numel()
    out = torch.empty(n_blocks, dtype=torch.float32, device=w.absmax.device)
    _nf4_absmax_kernel[(triton.cdiv(n_blocks, _BLOCK),)](
        w.absmax, w.nested_absmax, w.nested_code, out, n_blocks, float(w.offset),
        NESTED_LOG2=_log2(w.nested_blocksize, "nested_blocksize"), BLOCK=_BLOCK, num_warps=4,
        enable_fp_fusion=False,
    )
    return out


_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequantize_to_buffer(w, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize into the shared per-(device, dtype) buffer; valid until the next call on that device."""
    device = w.packed.device
    n = w.shape.numel()
    buf = _BUFFERS.get((device, dtype))
    if buf is None or buf.numel() < n:
        _BUFFERS.pop((device, dtype), None)  # free the old one before allocating the larger one
        buf = torch.empty(n, dtype=dtype, device=device)
        _BUFFERS[(device, dtype)] = buf
    return nf4_dequantize(w, dtype, out=buf)


def release_buffers() -> None:
    """Drop the shared dequantization buffers (e.g. before evaluation on a different model)."""
    _BUFFERS.clear()

"""NF4 dequantization: packed 4-bit codes -> a dense (out, in) weight, bit for bit NF4Weight.dequantize().

Math (bitsandbytes' layout, research/formats.md section 2): over the flattened row-major weight,
    w[i] = code[nibble(i)] * absmax[i // blocksize]          (fp32, then one cast to the output dtype)
    nibble(2k) = packed[k] >> 4,  nibble(2k + 1) = packed[k] & 15
With double quantization the block scales are themselves 8-bit codes:
    absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset   (fp32)
Shapes: packed uint8 (ceil(n/2),), absmax (n_blocks,) fp32 or uint8, nested_absmax fp32
(ceil(n_blocks/256),), nested_code fp32 (256,), code fp32 (16,). Output (out, in) in `dtype`
(default the weight's original dtype).

Kernel: the op moves 2.5 bytes per weight in bf16 (0.5 read, 2 written), so it is a copy-bandwidth
problem as long as the instruction issue keeps up: at ~4.3 TB/s an H200 SM must turn out ~7 weights per
cycle, which leaves ~17-19 thread instructions per weight. Each program takes `block` packed bytes as
rows of cols = min(blocksize / 2, block) consecutive bytes: every row lies inside one quantization block
(blocksizes are powers of two >= 32), so a row's scale is decoded once -- one absmax load and,
double-quantized, two table loads per row, not per byte -- and broadcast over the row. The two nibbles of
a byte go through the 16-entry fp32 code table (64 bytes: one L1 line, so a warp's gather is one
wavefront; a 256-entry byte -> pair table would be 2 KiB and split a warp's gather over up to 16 lines),
are scaled, interleaved (high first) and stored. Launches whose bytes fill whole programs and whose n is
even compile without masks. DEFAULT loads 16 bytes per thread (vec=16) and lets the compiler reshuffle the
weights through shared memory before the stores: on an H200 that measured 13% faster than BYTEWISE (where
every byte gathers its own three scale values) and 1.17x the copy floor, while vec=4 tiles, fewer SASS
instructions per weight and no reshuffle, ran 2.4x slower than BYTEWISE (see DEFAULT).

The scales are decoded in the kernel, never cached per weight: an fp32 copy would add 1/8 of the packed
size to the frozen model (4 bytes per 32-byte block; ~0.4 GB on a 7B) and read 4 bytes per block instead
of 1, to save three loads per row. `LaunchConfig` holds the launch knobs (`_launch(..., config=)`), `SWEEP`
the candidates benchmarks/bench_dequant.py times, and `BYTEWISE` the kernel that decodes a scale per byte,
the benchmark's baseline.

Bit-exactness: the scale is rebuilt with a separate multiply and add, launched with
`enable_fp_fusion=False` so the compiler cannot contract them into an FMA (one rounding instead of the
reference's two); the product code*absmax is a single fp32 rounding, and the cast is
round-to-nearest-even, as in torch.

No autograd: the weight is frozen. `nf4_dequantize(w, dtype, out=)` writes into a caller's buffer: the
fused linear keeps one per device (`lora_linear.dequant_buffer`), so QLoRA adds one dense weight (or one
q|k|v group) to peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _runtime
from .reference import nf4_absmax_reference, nf4_dequantize_reference

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _code_lookup(code_ptr, nibbles, SHARED: tl.constexpr):
        """code[nibbles] (fp32). SHARED: from a copy of the 16 entries in shared memory (tl.gather; 32-bit
        addresses, conflict-free banks), else a gather from global memory (one L1 line, 64-bit addresses)."""
        if SHARED:
            flat = tl.reshape(nibbles, (nibbles.numel,))
            return tl.reshape(tl.gather(tl.load(code_ptr + tl.arange(0, 16)), flat, 0), nibbles.shape)
        return tl.load(code_ptr + nibbles)

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        code_ptr,
        out_ptr,
        n,
        n_bytes,
        offset,
        row_scale_ptr,
        blocks_per_row,
        BYTE_BLOCK_LOG2: tl.constexpr,
        NESTED_LOG2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        VEC: tl.constexpr,
        SHARED_CODE: tl.constexpr,
        MASKED: tl.constexpr,
        ROW_SCALE: tl.constexpr = False,
        OUT_MAX: tl.constexpr = 0.0,
    ):
        # Tile (ROWS, COLS // VEC, VEC) bytes -> (ROWS, COLS // VEC, 2 * VEC) weights: the innermost VEC bytes
        # are what one thread loads at once, so VEC = 4 gives each thread the 8 weights of one 16-byte bf16
        # store (load and store layouts agree); a wider VEC loads more per instruction but makes the compiler
        # reshuffle the weights through shared memory before the store.
        start = tl.program_id(0).to(tl.int64) * (ROWS * COLS)  # first byte; offsets inside the tile stay int32
        row = tl.arange(0, ROWS) * COLS
        chunk = tl.arange(0, COLS // VEC)[None, :, None]
        byte = row[:, None, None] + chunk * VEC + tl.arange(0, VEC)[None, None, :]
        elem = 2 * row[:, None, None] + chunk * (2 * VEC) + tl.arange(0, 2 * VEC)[None, None, :]
        byte_ok, row_ok, elem_ok = None, None, None
        if MASKED:
            bytes_left = tl.minimum(n_bytes - start, ROWS * COLS).to(tl.int32)
            byte_ok, row_ok, elem_ok = byte < bytes_left, row < bytes_left, elem < n - 2 * start
        packed = tl.load(packed_ptr + start + byte, mask=byte_ok).to(tl.int32)  # masked lanes: any byte is safe
        # One quantization block per row. A program starts on a quantization-block boundary or lies inside
        # one block (both sizes are powers of two), so (start + row) >> k == (start >> k) + (row >> k).
        first_blk = start >> BYTE_BLOCK_LOG2
        blk = row >> BYTE_BLOCK_LOG2
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + first_blk + blk, mask=row_ok).to(tl.int32)
            nested = tl.load(nested_absmax_ptr + ((first_blk + blk) >> NESTED_LOG2), mask=row_ok)
            scale = tl.load(nested_code_ptr + q) * nested
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + first_blk + blk, mask=row_ok)
        if ROW_SCALE:  # FP8 output: w / row_scale[w's row], clamped into the format's range (fp8.py)
            scale = tl.math.div_rn(
                scale, tl.load(row_scale_ptr + (first_blk + blk) // blocks_per_row, mask=row_ok)
            )  # IEEE division, as fp8.nf4_to_fp8's reference
        scale = scale[:, None, None]
        hi = _code_lookup(code_ptr, packed >> 4, SHARED_CODE) * scale
        lo = _code_lookup(code_ptr, packed & 15, SHARED_CODE) * scale
        vals = tl.interleave(hi, lo)
        if ROW_SCALE:
            vals = tl.minimum(tl.maximum(vals, -OUT_MAX), OUT_MAX)
        vals = vals.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + 2 * start + elem, vals, mask=elem_ok)

    @triton.jit
    def _nf4_dequant_kernel_bytewise(
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        code_ptr,
        out_ptr,
        n,
        n_bytes,
        offset,
        BYTE_BLOCK_LOG2: tl.constexpr,
        NESTED_LOG2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # BYTEWISE, the benchmark's baseline: every byte gathers its own scale.
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BLOCK + tl.arange(0, BLOCK)
        in_range = byte < n_bytes
        packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
        blk = byte >> BYTE_BLOCK_LOG2  # weights 2k and 2k+1 share block (2k) // blocksize
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * tl.load(
                nested_absmax_ptr + (blk >> NESTED_LOG2), mask=in_range, other=0.0
            )
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)
        hi = tl.load(code_ptr + (packed >> 4)) * scale
        lo = tl.load(code_ptr + (packed & 15)) * scale
        vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
        elem = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + elem, vals, mask=elem < n)

    @triton.jit
    def _nf4_absmax_kernel(
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        out_ptr,
        n_blocks,
        offset,
        NESTED_LOG2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        blk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = blk < n_blocks
        q = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(
            nested_absmax_ptr + (blk >> NESTED_LOG2), mask=in_range, other=0.0
        )
        tl.store(out_ptr + blk, scale + offset, mask=in_range)


def _log2(v: int, what: str) -> int:
    if v < 2 or v & (v - 1):
        raise ValueError(f"NF4 {what} must be a power of two, got {v}")
    return v.bit_length() - 1


@dataclass(frozen=True)
class LaunchConfig:
    """How `_launch` runs the dequantization: `block` packed bytes (2 * block weights) per program, `vec` bytes
    per thread per load, the code table read from shared memory (`shared_code`) or through L1."""

    block: int
    num_warps: int
    vec: int = 4
    shared_code: bool = False
    bytewise: bool = False  # the previous kernel, one scale gather per byte (the benchmark's baseline)

    def __post_init__(self):
        _log2(self.block, "launch block")
        _log2(self.vec, "launch vec")

    def __str__(self) -> str:
        if self.bytewise:
            return f"bytewise-b{self.block}-w{self.num_warps}"
        return f"tiled-b{self.block}-w{self.num_warps}-v{self.vec}{'-smem' if self.shared_code else ''}"


BYTEWISE = LaunchConfig(block=1024, num_warps=4, bytewise=True)  # a scale decoded per byte: the benchmark's baseline
# Measured (benchmarks/bench_dequant.py, H200, bf16, the three 7B shapes; benchmarks/NOTES.md): 21.6 us a call on
# average over a step's 672 calls, 1.17x the copy-bandwidth floor, against 24.9 us for BYTEWISE. The vec=4 tiles
# that looked best by instruction count ran 2.4x slower than BYTEWISE there: their 4-byte loads underuse the
# memory system, which the instruction count does not see.
DEFAULT = LaunchConfig(block=2048, num_warps=4, vec=16)
# What the benchmark times: program size x warps with vec=4 (load and store layouts agree); vec=16 (one
# 16-byte load per thread, weights reshuffled through shared memory); the code table in shared memory
# (tl.gather: 32-bit addresses, fewer instructions, but barriers per program).
SWEEP = (
    BYTEWISE,
    LaunchConfig(1024, 4),
    LaunchConfig(2048, 4),
    LaunchConfig(2048, 8),
    LaunchConfig(4096, 4),
    LaunchConfig(4096, 8),
    LaunchConfig(8192, 8),
    LaunchConfig(2048, 4, vec=16),
    LaunchConfig(4096, 8, vec=16),
    LaunchConfig(2048, 4, shared_code=True),
    LaunchConfig(4096, 4, shared_code=True),
    LaunchConfig(4096, 8, shared_code=True),
)
_ABSMAX_BLOCK = 1024


def _launch(
    w, out_flat: torch.Tensor, *, config: LaunchConfig | None = None, row_scale: torch.Tensor | None = None
) -> None:
    """Decode `w` into the contiguous (n,) `out_flat` with `config` (default: DEFAULT). With `row_scale` (fp32, one
    per row of the 2-D weight; rows a whole number of blocks) each weight is divided by its row's scale and clamped
    to the output format's largest finite value (the FP8 path, fp8.py)."""
    config = config or DEFAULT
    if row_scale is not None and (config.bytewise or w.shape[-1] % w.blocksize):
        raise ValueError(
            f"row scales need the tiled kernel and rows of whole blocks, not {tuple(w.shape)} / {w.blocksize}"
        )
    n = w.shape.numel()
    packed = w.packed.reshape(-1)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    n_bytes = packed.numel()
    dq = w.nested_absmax is not None
    code = w.code.to(device=packed.device, dtype=torch.float32)
    nested_absmax = w.nested_absmax if dq else code  # unused pointers still need a tensor
    nested_code = w.nested_code if dq else code
    byte_block_log2 = _log2(w.blocksize, "blocksize") - 1
    args = (packed, w.absmax, nested_absmax, nested_code, code, out_flat, n, n_bytes, float(w.offset) if dq else 0.0)
    meta = dict(
        BYTE_BLOCK_LOG2=byte_block_log2,
        NESTED_LOG2=_log2(w.nested_blocksize, "nested_blocksize") if dq else 0,
        DOUBLE_QUANT=dq,
        num_warps=config.num_warps,
        enable_fp_fusion=False,
    )
    grid = (triton.cdiv(n_bytes, config.block),)
    if config.bytewise:
        _nf4_dequant_kernel_bytewise[grid](*args, BLOCK=config.block, **meta)
        return
    cols = min(1 << byte_block_log2, config.block)  # a row never crosses a quantization block
    masked = n_bytes % config.block != 0 or n % 2 != 0
    rows_args = (code, 1) if row_scale is None else (row_scale, w.shape[-1] // w.blocksize)
    extra = {} if row_scale is None else {"ROW_SCALE": True, "OUT_MAX": float(torch.finfo(out_flat.dtype).max)}
    _nf4_dequant_kernel[grid](
        *args,
        *rows_args,
        ROWS=config.block // cols,
        COLS=cols,
        VEC=min(config.vec, cols),
        SHARED_CODE=config.shared_code,
        MASKED=masked,
        **extra,
        **meta,
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
    _nf4_absmax_kernel[(triton.cdiv(n_blocks, _ABSMAX_BLOCK),)](
        w.absmax,
        w.nested_absmax,
        w.nested_code,
        out,
        n_blocks,
        float(w.offset),
        NESTED_LOG2=_log2(w.nested_blocksize, "nested_blocksize"),
        BLOCK=_ABSMAX_BLOCK,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out

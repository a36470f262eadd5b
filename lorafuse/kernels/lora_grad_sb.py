"""dS and dB of a LoRA linear's backward from ONE read of dY (experimental.fused_ds_db; lora_linear.py calls it).

    grad_s_b:       dS = dY @ (s B)    (M, r), in dY's dtype
                    dB = s dY^T @ S    (N, r), fp32

Shapes: dY (M, N), S (M, r), B (N, r), s the LoRA scaling; strides are passed, so transposed views need no copy.
A program owns a row tile of M and a range of N's columns: it reads each dY tile once, accumulates its rows of dS
over its columns and writes the tile's dB rows. Both come out as fp32 partials (dS per column split, dB per row
tile) summed in a fixed order afterwards: deterministic, unlike atomics. Accumulation is fp32; `tl.dot` uses exact
fp32 ("ieee") for fp32 operands and the tensor cores for bf16/fp16. No dropout: dY is the output's gradient.
"""

from __future__ import annotations

import torch

from . import _runtime

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @_runtime.tuned(
        [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=3) for bn, w in [(64, 4), (128, 8)]],
        key=["M_BUCKET", "N", "R"],
        interpret_meta={"BLOCK_N": 32},
    )
    @triton.jit
    def _grad_s_b_kernel(
        dy_ptr,
        bs_ptr,
        s_ptr,
        ds_part_ptr,
        db_part_ptr,
        M,
        N,
        R,
        M_BUCKET,
        cols_per_split,
        stride_dym,
        stride_dyn,
        stride_bn,
        stride_br,
        stride_sm,
        stride_sr,
        PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # program (row tile pm, column split pn): dS rows over its columns -> ds_part[pn];
        # dB rows of each column tile over its rows -> db_part[pm]; each dY tile is read once
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr[None, :] < R
        s = tl.load(
            s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=(rm[:, None] < M) & r_mask, other=0.0
        )
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_start = pn * cols_per_split
        n_end = tl.minimum(n_start + cols_per_split, N)
        for n0 in range(n_start, n_end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(
                dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
                mask=(rm[:, None] < M) & (rn[None, :] < n_end),
                other=0.0,
            )
            bs = tl.load(
                bs_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=(rn[:, None] < n_end) & r_mask,
                other=0.0,
            )
            ds = tl.dot(dy, bs, ds, input_precision=PRECISION)
            db = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
            tl.store(
                db_part_ptr + (pm * N + rn[:, None]).to(tl.int64) * R + rr[None, :],
                db,
                mask=(rn[:, None] < n_end) & r_mask,
            )
        tl.store(
            ds_part_ptr + (pn * M + rm[:, None]).to(tl.int64) * R + rr[None, :], ds, mask=(rm[:, None] < M) & r_mask
        )


def grad_s_b(dy: torch.Tensor, s: torch.Tensor, b_scaled: torch.Tensor, scaling: float):
    """(dS (M, r) in dy.dtype, dB (N, r) fp32) = (dy @ b_scaled, scaling * dy^T @ s), one pass over dy.

    b_scaled is s*B (N, r) in dy.dtype. The row tile is fixed (the dB partials are allocated per row
    tile); the column range is split so that row tiles x splits fill the GPU.
    """
    M, N = dy.shape
    r = s.shape[1]
    block_m = 16 if _runtime.INTERPRET else 128
    m_tiles = triton.cdiv(M, block_m)
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 4
    splits = max(1, min(triton.cdiv(N, 512), triton.cdiv(2 * sms, m_tiles)))
    cols_per_split = triton.cdiv(triton.cdiv(N, splits), 128) * 128
    splits = triton.cdiv(N, cols_per_split)
    ds_part = torch.empty(splits, M, r, dtype=torch.float32, device=dy.device)
    db_part = torch.empty(m_tiles, N, r, dtype=torch.float32, device=dy.device)
    _grad_s_b_kernel[(m_tiles, splits)](
        dy,
        b_scaled,
        s,
        ds_part,
        db_part,
        M,
        N,
        r,
        _runtime.m_bucket(M),
        cols_per_split,
        dy.stride(0),
        dy.stride(1),
        b_scaled.stride(0),
        b_scaled.stride(1),
        s.stride(0),
        s.stride(1),
        PRECISION=_runtime.dot_precision(dy.dtype),
        BLOCK_R=_runtime.rank_block(r),
        BLOCK_M=block_m,
    )
    return ds_part.sum(0).to(dy.dtype), db_part.sum(0).mul_(scaling)

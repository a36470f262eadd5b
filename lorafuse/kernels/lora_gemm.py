"""Triton GEMMs of the fused LoRA linear with dropout inside (LoRAFusion's split of the graph at the small (M, r)
tensor S).

    masked_lora_product: C += drop'(S @ L)                the backward's dX += drop'(dS A) after cuBLAS's dY W:
                                                          the rank-r product, masked on (m, n), added in one pass
    dropout_down:   S  = (X * keep / (1-p)) @ A^T          dropout and the down-projection in one pass
    dropout_grad_a: dA = dS^T @ (X * keep / (1-p))         fp32 out, split over M, partials summed in order

Shapes: X (M, K), S (M, r), A (r, K), L (r, N); strides are passed, so transposed views need no copy.
Accumulation is fp32; `tl.dot` uses exact fp32 ("ieee") for fp32
operands and the tensor cores for bf16/fp16. The dropout mask is the counter hash of reference.py:
keep[i, j] = mix32((i * cols + j) ^ key) >> 8 >= round(p * 2^24), regenerated wherever it is needed.
Element counters are int32: M * K must stay below 2^31 (2^19 tokens at K = 4096).
dS and dB from one read of dY (no dropout there) are lora_grad_sb.py's.

No autograd here: lora_linear.py calls these from its Functions (swiglu_mlp.py through it).
"""

from __future__ import annotations

import torch

from . import _runtime
from .reference import SEED_MUL, DropoutSeed, dropout_threshold

assert SEED_MUL == 0x61C88647, "the kernels below inline reference.SEED_MUL"

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _keep(key, idx, thresh):
        x = idx.to(tl.uint32) ^ key.to(tl.uint32)
        x ^= x >> 16
        x = x * 0x21F0AAAD
        x ^= x >> 15
        x = x * 0x735A2D97
        x ^= x >> 15
        return (x >> 8).to(tl.int32) >= thresh

    @triton.jit
    def _seed_key(seed_ptr, seed_off):
        # reference.dropout_seed_key of the seed (base * SEED_MUL + off) mod 2^32, base read on the device
        base = tl.load(seed_ptr).to(tl.uint32).to(tl.uint64)
        x = (base * 0x61C88647 + seed_off).to(tl.uint32)  # 0x61C88647 == reference.SEED_MUL
        x ^= x >> 16
        x = x * 0x21F0AAAD
        x ^= x >> 15
        x = x * 0x735A2D97
        x ^= x >> 15
        return x & 0x7FFFFFFF

    @triton.jit
    def _keep_mask_kernel(out_ptr, n, seed_ptr, seed_off, thresh, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + idx, _keep(_seed_key(seed_ptr, seed_off), idx, thresh).to(tl.int8), mask=idx < n)

    _PRODUCT_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [(128, 128, 8, 3), (64, 128, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4)]
    ]

    @_runtime.tuned(
        _PRODUCT_CONFIGS,
        key=["M_BUCKET", "N", "R"],
        interpret_meta={"BLOCK_M": 16, "BLOCK_N": 32},
        restore_value=["c_ptr"],
    )
    @triton.jit
    def _masked_product_kernel(
        s_ptr,
        l_ptr,
        c_ptr,
        M,
        N,
        R,
        M_BUCKET,
        stride_sm,
        stride_sr,
        stride_lr,
        stride_ln,
        stride_cm,
        stride_cn,
        drop_seed_ptr,
        drop_seed_off,
        drop_thresh,
        drop_scale,
        PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # C[m, n] += keep(m, n) * scale * (S L)[m, n]: the mask is the forward's dropout mask of x, read on (m, n)
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        s = tl.load(
            s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
            mask=(rm[:, None] < M) & (rr[None, :] < R),
            other=0.0,
        )
        lw = tl.load(
            l_ptr + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
            mask=(rr[:, None] < R) & (rn[None, :] < N),
            other=0.0,
        )
        prod = tl.dot(s, lw, input_precision=PRECISION)
        keep = _keep(_seed_key(drop_seed_ptr, drop_seed_off), rm[:, None] * N + rn[None, :], drop_thresh)
        prod = tl.where(keep, prod * drop_scale, 0.0)
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
        prod += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, prod.to(c_ptr.dtype.element_ty), mask=c_mask)

    _SKINNY_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4, num_stages=s)
        for bm, bk, s in [(16, 128, 4), (32, 128, 4), (64, 64, 3)]
    ]

    @_runtime.tuned(_SKINNY_CONFIGS, key=["M_BUCKET", "K", "R"], interpret_meta={"BLOCK_M": 16, "BLOCK_K": 32})
    @triton.jit
    def _dropout_down_kernel(
        x_ptr,
        a_ptr,
        s_ptr,
        M,
        K,
        R,
        M_BUCKET,
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        drop_seed_ptr,
        drop_seed_off,
        drop_thresh,
        drop_scale,
        PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        drop_key = _seed_key(drop_seed_ptr, drop_seed_off)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk,
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            x = tl.where(_keep(drop_key, rm[:, None] * K + kk[None, :], drop_thresh), x, 0.0)
            a = tl.load(
                a_ptr + kk[:, None] * stride_ak + rr[None, :] * stride_ar,
                mask=(kk[:, None] < K) & (rr[None, :] < R),
                other=0.0,
            )
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        acc = acc * drop_scale
        tl.store(
            s_ptr + rm[:, None] * R + rr[None, :],
            acc.to(s_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rr[None, :] < R),
        )

    @_runtime.tuned(_SKINNY_CONFIGS, key=["M_BUCKET", "K", "R"], interpret_meta={"BLOCK_M": 16, "BLOCK_K": 32})
    @triton.jit
    def _dropout_grad_a_kernel(
        ds_ptr,
        x_ptr,
        part_ptr,
        M,
        K,
        R,
        M_BUCKET,
        rows_per_split,
        stride_dsm,
        stride_dsr,
        stride_xm,
        stride_xk,
        drop_seed_ptr,
        drop_seed_off,
        drop_thresh,
        drop_scale,
        PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # program (k tile, split): partial dA over rows [split * rows_per_split, ...) -> part[split]
        pid_k, split = tl.program_id(0), tl.program_id(1)
        kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        m_start = split * rows_per_split
        m_end = tl.minimum(m_start + rows_per_split, M)
        drop_key = _seed_key(drop_seed_ptr, drop_seed_off)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            ds_t = tl.load(
                ds_ptr + rm[None, :] * stride_dsm + rr[:, None] * stride_dsr,
                mask=(rm[None, :] < m_end) & (rr[:, None] < R),
                other=0.0,
            )
            x = tl.load(
                x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk,
                mask=(rm[:, None] < m_end) & (kk[None, :] < K),
                other=0.0,
            )
            x = tl.where(_keep(drop_key, rm[:, None] * K + kk[None, :], drop_thresh), x, 0.0)
            acc = tl.dot(ds_t, x, acc, input_precision=PRECISION)
        acc = acc * drop_scale
        tl.store(
            part_ptr + split * R * K + rr[:, None] * K + kk[None, :], acc, mask=(rr[:, None] < R) & (kk[None, :] < K)
        )


_ZERO_BASE: dict = {}


class Dropout:
    """One dropout mask's arguments: the seed (an int, or a DropoutSeed read by the kernel on the device),
    the integer threshold, 1/(1-p). The kernels hash (base * SEED_MUL + offset) into the key themselves."""

    def __init__(self, p: float, seed):
        self.p, self.seed = p, seed
        self.thresh = dropout_threshold(p)
        self.scale = 1.0 / (1.0 - p)

    def seed_args(self, device) -> tuple[torch.Tensor, int]:
        """(base tensor, offset): a DropoutSeed's own, or (a zero base, the int seed)."""
        if isinstance(self.seed, DropoutSeed):
            return self.seed.base, self.seed.offset
        key = str(device)
        if key not in _ZERO_BASE:
            _ZERO_BASE[key] = torch.zeros((), dtype=torch.int64, device=device)
        return _ZERO_BASE[key], int(self.seed) & 0xFFFFFFFF


def _check_counters(rows: int, cols: int) -> None:
    if rows * cols >= 2**31:
        raise ValueError(f"dropout counters overflow int32 at {rows} x {cols}; use fewer tokens per micro-batch")


def keep_mask(seed, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """The kernels' dropout mask as a bool (rows, cols) tensor (tests and debugging); seed: int or DropoutSeed."""
    _check_counters(rows, cols)
    out = torch.empty(rows * cols, dtype=torch.int8, device=device)
    base, off = Dropout(p, seed).seed_args(device)
    _keep_mask_kernel[(triton.cdiv(rows * cols, 1024),)](out, rows * cols, base, off, dropout_threshold(p), BLOCK=1024)
    return out.view(rows, cols).bool()


def masked_lora_product(out: torch.Tensor, s: torch.Tensor, rhs: torch.Tensor, drop: Dropout) -> torch.Tensor:
    """out (M, N) += drop'(s @ rhs): s (M, r), rhs (r, N) (any strides, e.g. A), the product masked by `drop` on
    (m, n) and scaled by 1 / (1 - p), in fp32 before one rounding into out's dtype."""
    M, N = out.shape
    _check_counters(M, N)
    r = s.shape[1]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _masked_product_kernel[grid](
        s,
        rhs,
        out,
        M,
        N,
        r,
        _runtime.m_bucket(M),
        s.stride(0),
        s.stride(1),
        rhs.stride(0),
        rhs.stride(1),
        out.stride(0),
        out.stride(1),
        *drop.seed_args(out.device),
        drop.thresh,
        drop.scale,
        PRECISION=_runtime.dot_precision(out.dtype),
        BLOCK_R=_runtime.rank_block(r),
    )
    return out


def dropout_down(x: torch.Tensor, a: torch.Tensor, drop: Dropout) -> torch.Tensor:
    """S (M, r) = (x * keep / (1-p)) @ a^T in x.dtype; a is (r, K) in x.dtype."""
    M, K = x.shape
    r = a.shape[0]
    _check_counters(M, K)
    s = torch.empty(M, r, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _dropout_down_kernel[grid](
        x,
        a,
        s,
        M,
        K,
        r,
        _runtime.m_bucket(M),
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        *drop.seed_args(x.device),
        drop.thresh,
        drop.scale,
        PRECISION=_runtime.dot_precision(x.dtype),
        BLOCK_R=_runtime.rank_block(r),
    )
    return s


def dropout_grad_a(ds: torch.Tensor, x: torch.Tensor, drop: Dropout, splits: int | None = None) -> torch.Tensor:
    """dA (r, K) fp32 = ds^T @ (x * keep / (1-p)); ds (M, r), x (M, K) in one dtype."""
    M, K = x.shape
    r = ds.shape[1]
    _check_counters(M, K)
    if splits is None:  # enough programs to fill the GPU; each split sums >= 256 rows
        splits = max(1, min(triton.cdiv(M, 256), 32))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 64) * 64
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty(splits, r, K, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)  # noqa: E731
    _dropout_grad_a_kernel[grid](
        ds,
        x,
        part,
        M,
        K,
        r,
        _runtime.m_bucket(M),
        rows_per_split,
        ds.stride(0),
        ds.stride(1),
        x.stride(0),
        x.stride(1),
        *drop.seed_args(x.device),
        drop.thresh,
        drop.scale,
        PRECISION=_runtime.dot_precision(x.dtype),
        BLOCK_R=_runtime.rank_block(r),
    )
    return part.sum(0)  # a fixed-order sum: deterministic, unlike atomics

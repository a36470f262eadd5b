"""Fused block-wise 8-bit AdamW update: one Triton launch for many parameters, or one per parameter.

Math (per element, step t, decoupled weight decay wd; `lorafuse.training.optim8bit` has the derivation):

    m = b1 m + (1 - b1) g                   v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

States: m and v as uint8 codes into 256-entry dynamic maps (signed for m, unsigned for v) and one fp32 absmax per
block of 256 elements. One program handles one block (`_adamw8bit_block`, shared by both kernels, so their results
are bit-identical): it decodes m and v (`map[q] * absmax`), applies the update in fp32, writes p back in its own
dtype, then re-encodes: absmax = max|x| over the block, code = the number of map midpoints strictly below
x / absmax (what `torch.bucketize(right=False)` returns in the reference), found by an 8-step binary search over
the 255 midpoints.

Shapes: p, g (n,) any float dtype (flattened views); m_q, v_q (n,) uint8; m_absmax, v_absmax (ceil(n/256),) fp32.

Why one launch: the PyTorch reference spends ~25 small kernels per parameter; with the 448 LoRA tensors of a 7B
model that is ~11,000 launches per optimizer step. One launch per parameter (`adamw8bit_update`) brings it to 448,
measured on an H200 at 2.6 ms of kernel time and ~5 ms of host launch time per step: the GPU waits on the host.
`adamw8bit_multi_update` updates every parameter that can share a launch (same device, parameter dtype, gradient
dtype and step, and one param_group's lr/betas/eps/wd) in ONE launch whose grid is the total number of 256-blocks.

Tables of a multi-tensor launch (device tensors, built on the host, one non_blocking copy from pinned memory):

    ptrs   int64 (P, 8): per parameter i, the addresses of p, g, m_q, m_absmax, v_q, v_absmax, then n_i, 0
    blocks int32 (B, 2): per program (B = sum_i ceil(n_i / 256)), the parameter index i and the block index in it

`LaunchTables` caches them: `ptrs` keyed by the addresses and sizes (a pointer that moves, e.g. a gradient
re-allocated after zero_grad(set_to_none=True), builds a new table; with CUDA graphs the addresses stay and the
table is reused), `blocks` keyed by the sizes alone. A cached step reads data_ptr()s and hashes them: no host-device
sync, no copy. Tables no launch used in a step are dropped by `prune()`.

Apply flag: both kernels read a 0-dim device tensor `apply` (the training loop's "this step's loss and gradient norm
are finite") and, where it is 0, store nothing: a skipped step costs no host synchronisation, and p and the states
keep every bit. The step count they are given is the caller's (lorafuse.training.readback.CancelledSteps).

Fallback, per parameter (`adamw8bit_update`): a parameter or gradient that is not contiguous, a dtype other than
fp32/fp16/bf16, states whose block size is not 256, a launch group of one parameter; the paged optimizer (states
fetched one parameter at a time) uses it too, and so do CUDA tensors under TRITON_INTERPRET=1 (the interpreter
copies each tensor argument to the host; the addresses in a table would still point at the GPU). Without a GPU
(and outside the interpreter tests) the caller uses the PyTorch reference.
"""

from __future__ import annotations

import math

import torch

from lorafuse.kernels._runtime import HAS_TRITON, INTERPRET, use_triton

BLOCK = 256

if HAS_TRITON:
    import triton
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    @triton.jit
    def _nearest_code(x, bounds_ptr):
        # count of midpoints < x over the 255 sorted midpoints (binary search, 8 steps)
        idx = tl.zeros(x.shape, dtype=tl.int32)
        for shift in tl.static_range(8):
            step = 128 >> shift
            cand = idx + step
            b = tl.load(bounds_ptr + tl.minimum(cand, 255) - 1)
            idx = tl.where((cand <= 255) & (b < x), cand, idx)
        return idx

    @triton.jit
    def _adamw8bit_block(
        p_ptr,
        g_ptr,
        mq_ptr,
        ma_ptr,
        vq_ptr,
        va_ptr,
        smap_ptr,
        umap_ptr,
        sb_ptr,
        ub_ptr,
        n,
        blk,
        lr,
        b1,
        b2,
        eps,
        wd,
        bias1,
        bias2_sqrt,
        apply_ptr,
        BLOCK_SIZE: tl.constexpr,
    ):
        offs = blk.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        keep = tl.load(apply_ptr) != 0  # the step's device-side flag: False writes nothing (module docstring)
        mask = offs < n
        write = offs < tl.where(keep, n, 0)  # mask & keep (a block & scalar mask fails in Triton's interpreter)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
        p = p_raw.to(tl.float32)
        mq = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
        vq = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(smap_ptr + mq) * tl.load(ma_ptr + blk)
        v = tl.load(umap_ptr + vq) * tl.load(va_ptr + blk)
        m = m * b1 + g * (1.0 - b1)
        v = v * b2 + g * g * (1.0 - b2)
        denom = tl.sqrt(v) / bias2_sqrt + eps
        p = p * (1.0 - lr * wd)
        p = p - (lr / bias1) * (m / denom)
        tl.store(p_ptr + offs, p.to(p_raw.dtype), mask=write)
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        m_abs = tl.max(tl.abs(m), axis=0)
        v_abs = tl.max(tl.abs(v), axis=0)
        tiny = 1.1754943508222875e-38
        m_code = _nearest_code(m / tl.maximum(m_abs, tiny), sb_ptr)
        v_code = _nearest_code(v / tl.maximum(v_abs, tiny), ub_ptr)
        tl.store(mq_ptr + offs, m_code.to(tl.uint8), mask=write)
        tl.store(vq_ptr + offs, v_code.to(tl.uint8), mask=write)
        tl.store(ma_ptr + blk, m_abs, mask=keep)
        tl.store(va_ptr + blk, v_abs, mask=keep)

    @triton.jit
    def _adamw8bit_kernel(
        p_ptr,
        g_ptr,
        mq_ptr,
        ma_ptr,
        vq_ptr,
        va_ptr,
        smap_ptr,
        umap_ptr,
        sb_ptr,
        ub_ptr,
        n,
        lr,
        b1,
        b2,
        eps,
        wd,
        bias1,
        bias2_sqrt,
        apply_ptr,
        BLOCK_SIZE: tl.constexpr,
    ):
        _adamw8bit_block(
            p_ptr,
            g_ptr,
            mq_ptr,
            ma_ptr,
            vq_ptr,
            va_ptr,
            smap_ptr,
            umap_ptr,
            sb_ptr,
            ub_ptr,
            n,
            tl.program_id(0),
            lr,
            b1,
            b2,
            eps,
            wd,
            bias1,
            bias2_sqrt,
            apply_ptr,
            BLOCK_SIZE,
        )

    @triton.jit
    def _adamw8bit_multi_kernel(
        ptrs_ptr,
        blocks_ptr,
        smap_ptr,
        umap_ptr,
        sb_ptr,
        ub_ptr,
        lr,
        b1,
        b2,
        eps,
        wd,
        bias1,
        bias2_sqrt,
        apply_ptr,
        P_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        row = ptrs_ptr + tl.load(blocks_ptr + 2 * pid).to(tl.int64) * 8
        blk = tl.load(blocks_ptr + 2 * pid + 1)
        _adamw8bit_block(
            tl.load(row).to(tl.pointer_type(P_DTYPE)),
            tl.load(row + 1).to(tl.pointer_type(G_DTYPE)),
            tl.load(row + 2).to(tl.pointer_type(tl.uint8)),
            tl.load(row + 3).to(tl.pointer_type(tl.float32)),
            tl.load(row + 4).to(tl.pointer_type(tl.uint8)),
            tl.load(row + 5).to(tl.pointer_type(tl.float32)),
            smap_ptr,
            umap_ptr,
            sb_ptr,
            ub_ptr,
            tl.load(row + 6),
            blk,
            lr,
            b1,
            b2,
            eps,
            wd,
            bias1,
            bias2_sqrt,
            apply_ptr,
            BLOCK_SIZE,
        )


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 decision boundaries between neighbouring entries of a sorted 256-entry map."""
    return (code[1:] + code[:-1]) / 2


def _scalars(step, lr, b1, b2, eps, wd) -> tuple:
    return (float(lr), float(b1), float(b2), float(eps), float(wd), float(1 - b1**step), float(math.sqrt(1 - b2**step)))


def _flag(apply: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The kernels' apply flag: a 0-dim tensor on `device` (bool as uint8, the same byte); None: always apply."""
    if apply is None:
        return torch.ones((), dtype=torch.uint8, device=device)
    return apply.view(torch.uint8) if apply.dtype == torch.bool else apply


def adamw8bit_update(
    flat_p, flat_g, state: dict, smap, umap, sbounds, ubounds, step, lr, b1, b2, eps, wd, apply=None
) -> bool:
    """Update `flat_p` in place with the fused kernel; False when the kernel cannot run (caller uses the reference).

    `state` holds m_q, m_absmax, v_q, v_absmax on flat_p's device; blocks of 256 (the kernel's one block size).
    `apply`: a 0-dim bool tensor on flat_p's device; False leaves p and the states untouched (None: update).
    """
    if (
        not use_triton(flat_p)
        or not flat_p.is_contiguous()
        or state["m_absmax"].numel() != triton.cdiv(flat_p.numel(), BLOCK)
    ):
        return False
    n = flat_p.numel()
    _adamw8bit_kernel[(triton.cdiv(n, BLOCK),)](
        flat_p,
        flat_g.contiguous(),
        state["m_q"],
        state["m_absmax"],
        state["v_q"],
        state["v_absmax"],
        smap,
        umap,
        sbounds,
        ubounds,
        n,
        *_scalars(step, lr, b1, b2, eps, wd),
        _flag(apply, flat_p.device),
        BLOCK_SIZE=BLOCK,
        num_warps=2,
    )
    return True


def multi_tensor_ok(p: torch.Tensor, g: torch.Tensor, state: dict) -> bool:
    """Whether (p, g, state) may join a multi-tensor launch: contiguous, fp32/fp16/bf16, states in 256-blocks.
    (The device is checked once per launch, by `adamw8bit_multi_update`.)"""
    n = p.numel()
    return (
        HAS_TRITON
        and p.dtype in _TL_DTYPES
        and g.dtype in _TL_DTYPES
        and p.is_contiguous()
        and g.is_contiguous()
        and g.numel() == n
        and state["m_absmax"].numel() == -(-n // BLOCK)
    )


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: the host does not wait for the copy (the caching host allocator keeps the pinned
    # block until the copy is done); the launch after it on the same stream sees the table.
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


class LaunchTables:
    """The device tables of multi-tensor launches (module docstring), cached by addresses and sizes."""

    def __init__(self):
        self._ptrs: dict[tuple, torch.Tensor] = {}
        self._blocks: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._used_ptrs: set[tuple] = set()
        self._used_blocks: set[tuple] = set()

    def get(self, params, grads, states, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ptrs int64 (P, 8), blocks int32 (B, 2), B) for these tensors, from the cache when nothing moved."""
        key = []
        for p, g, s in zip(params, grads, states):
            key += (
                p.data_ptr(),
                g.data_ptr(),
                s["m_q"].data_ptr(),
                s["m_absmax"].data_ptr(),
                s["v_q"].data_ptr(),
                s["v_absmax"].data_ptr(),
                p.numel(),
                0,
            )
        key = (device, *key)
        sizes = (device, *key[7::8])
        if key not in self._ptrs:
            self._ptrs[key] = _to_device(torch.tensor(key[1:], dtype=torch.int64).view(-1, 8), device)
        if sizes not in self._blocks:
            self._blocks[sizes] = self._block_table(sizes[1:], device)
        self._used_ptrs.add(key)
        self._used_blocks.add(sizes)
        return self._ptrs[key], *self._blocks[sizes]

    @staticmethod
    def _block_table(sizes, device) -> tuple[torch.Tensor, int]:
        counts = torch.tensor(sizes, dtype=torch.int64).add_(BLOCK - 1).div_(BLOCK, rounding_mode="floor")
        param = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), counts)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        within = torch.arange(param.numel(), dtype=torch.int64) - first
        return _to_device(torch.stack([param, within], 1).to(torch.int32), device), param.numel()

    def prune(self) -> None:
        """Drop the tables that no launch used since the last prune (addresses that moved away)."""
        self._ptrs = {k: v for k, v in self._ptrs.items() if k in self._used_ptrs}
        self._blocks = {k: v for k, v in self._blocks.items() if k in self._used_blocks}
        self._used_ptrs, self._used_blocks = set(), set()


def adamw8bit_multi_update(
    params, grads, states, smap, umap, sbounds, ubounds, step, lr, b1, b2, eps, wd, tables: LaunchTables, apply=None
) -> bool:
    """Update every `params[i]` in place in one launch; False when the kernel cannot run on their device (the
    caller updates them one by one). Each (params[i], grads[i], states[i]) passed `multi_tensor_ok`; the states'
    step counters are the caller's, `step` is theirs after this update. `apply` as in `adamw8bit_update`."""
    p0, g0 = params[0], grads[0]
    if not use_triton(p0) or (INTERPRET and p0.is_cuda):  # the interpreter runs on host copies, not at addresses
        return False
    # One dtype per pointer type: the kernel reads and writes every parameter as P_DTYPE, every gradient as G_DTYPE.
    if len({(p.dtype, g.dtype, p.device, g.device) for p, g in zip(params, grads)}) != 1 or g0.device != p0.device:
        raise ValueError("adamw8bit_multi_update: one launch takes one device, one parameter dtype, one grad dtype")
    ptrs, blocks, nblocks = tables.get(params, grads, states, p0.device)
    if nblocks:
        _adamw8bit_multi_kernel[(nblocks,)](
            ptrs,
            blocks,
            smap,
            umap,
            sbounds,
            ubounds,
            *_scalars(step, lr, b1, b2, eps, wd),
            _flag(apply, p0.device),
            P_DTYPE=_TL_DTYPES[p0.dtype],
            G_DTYPE=_TL_DTYPES[g0.dtype],
            BLOCK_SIZE=BLOCK,
            num_warps=2,
        )
    return True

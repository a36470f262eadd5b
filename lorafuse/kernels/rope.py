"""Rotary position embedding (rotate-half form, HF Llama/Mistral/Qwen) on q and k, in place, in one kernel.

Math, per token (b, t) and head h, with x = (x1, x2) the two halves of the head dim D and
cos = (c1, c2), sin = (s1, s2) the halves of HF's (B, T, D) tables (HF stores cat(freqs, freqs), so
c1 == c2; the kernel reads both halves and never relies on it):
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
Backward, the transpose of that 2x2 block per frequency:
    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1
Shapes: q (B, T, Hq, D), k (B, T, Hk, D) (GQA: Hk divides Hq, any strides with a unit last stride,
so the (B, T, H, D) view of a projection output needs no copy); cos, sin (B or 1, T, D).
Dtype: math in fp32, one rounding to q's dtype (HF rounds each product and the sum in q's dtype).

One program per token rotates all of its q heads and k heads: cos/sin are read once per token.
Forward writes in place (autograd's mark_dirty) when q and k are tensors of their own. Autograd cannot
mark two outputs dirty when an input is a view (the attention's (B, T, H, D) view of a projection
output), so then the same kernel writes new q and k: the projection outputs are saved by nobody and
are freed right after, so this costs one transient allocation, no extra traffic. Backward writes new
gradient tensors. Saved for backward: cos and sin only (the rotary module's outputs, shared by every
layer).
"""

from __future__ import annotations

import torch

from . import _runtime
from .reference import rope_reference

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        src_ptr,
        dst_ptr,
        b,
        t,
        n_heads,
        half,
        c1,
        c2,
        s1,
        s2,
        s_b,
        s_t,
        s_h,
        d_b,
        d_t,
        d_h,
        BACKWARD: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_heads) & (cols < half)
        src = src_ptr + b * s_b + t * s_t + heads * s_h + cols
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        dst = dst_ptr + b * d_b + t * d_t + heads * d_h + cols
        tl.store(dst, y1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, y2.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        qo_ptr,
        ko_ptr,
        cos_ptr,
        sin_ptr,
        T,
        HQ,
        HK,
        half,
        sq_b,
        sq_t,
        sq_h,
        sk_b,
        sk_t,
        sk_h,
        oq_b,
        oq_t,
        oq_h,
        ok_b,
        ok_t,
        ok_h,
        sc_b,
        sc_t,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        b, t = tok // T, tok % T
        cols = tl.arange(0, BLOCK_D)[None, :]
        cmask = cols < half
        trig = b * sc_b + t * sc_t + cols  # sc_b == 0 broadcasts one table over the batch
        c1 = tl.load(cos_ptr + trig, mask=cmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + trig + half, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + trig, mask=cmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + trig + half, mask=cmask, other=0.0).to(tl.float32)
        _rotate_heads(
            q_ptr,
            qo_ptr,
            b,
            t,
            HQ,
            half,
            c1,
            c2,
            s1,
            s2,
            sq_b,
            sq_t,
            sq_h,
            oq_b,
            oq_t,
            oq_h,
            BACKWARD,
            BLOCK_HQ,
            BLOCK_D,
        )
        _rotate_heads(
            k_ptr,
            ko_ptr,
            b,
            t,
            HK,
            half,
            c1,
            c2,
            s1,
            s2,
            sk_b,
            sk_t,
            sk_h,
            ok_b,
            ok_t,
            ok_h,
            BACKWARD,
            BLOCK_HK,
            BLOCK_D,
        )


def _launch(q, k, q_out, k_out, cos, sin, backward: bool) -> None:
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    for x in (q, k, q_out, k_out, cos, sin):
        if x.stride(-1) != 1:
            raise ValueError("rope needs a unit stride on the head dim")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    sc_b = 0 if cos.shape[0] == 1 else cos.stride(0)  # one table broadcast over the batch
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    block_d = triton.next_power_of_2(d // 2)
    _rope_kernel[(bsz * t,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        t,
        hq,
        hk,
        d // 2,
        *q.stride()[:3],
        *k.stride()[:3],
        *q_out.stride()[:3],
        *k_out.stride()[:3],
        sc_b,
        cos.stride(1),
        BACKWARD=backward,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_D=block_d,
        num_warps=4 if block_hq * block_d <= 4096 else 8,
    )


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k in place; backward applies the transposed rotation (see the module docstring).

    Backward derivation: per frequency j the forward is the linear map [y1; y2] = [[c1, -s1], [s2, c2]]
    [x1; x2], so [dx1; dx2] = [[c1, s2], [-s1, c2]] [dy1; dy2]; cos and sin get no gradient (HF computes
    them from position ids under no_grad-equivalent ops of a non-trainable buffer).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        in_place = q._base is None and k._base is None
        q_out, k_out = (q, k) if in_place else (torch.empty_like(q), torch.empty_like(k))
        _launch(q, k, q_out, k_out, cos, sin, backward=False)
        if in_place:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk))  # e.g. expanded grads of a sum
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        _launch(dq, dk, dq_in, dk_in, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q_rot, k_rot) for q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (B or 1, T, D).

    The kernel rotates q and k in place when they are not views and returns them; otherwise (and on
    the CPU reference path) it returns new tensors. Always use the returned pair.
    """
    if not _runtime.use_triton(q):
        return rope_reference(q, k, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return RoPEFunction.apply(q, k, cos.detach(), sin.detach())

"""RMSNorm (Llama / Mistral / Qwen order), forward and backward in Triton.

Math, per row x of length H (rows = every leading index, x (..., H), weight w (H,)):
    rstd = 1 / sqrt(mean(x^2) + eps)            fp32
    n    = (x * rstd) rounded to x.dtype         (HF casts back to the input dtype before scaling)
    y    = w * n                                 in promote(w.dtype, x.dtype), computed in fp32
Backward (the cast is the identity for gradients, as in autograd):
    dn = dy * w;  dx = rstd * (dn - x * rstd^2 * mean(dn * x));  dw = sum_rows dy * n
Saved for backward: x, w and rstd (one fp32 per row). dw is computed only when w requires grad
(LoRA freezes norms, so usually never): each program folds its rows into one fp32 partial row and
the partials are summed in a fixed order (deterministic, no atomics).

One program holds a whole row in registers (H up to 16384 or so); the forward takes one row per
program, the backward strides over rows so the dw partials number at most 2 x SMs.
"""

from __future__ import annotations

import torch

from . import _runtime
from .reference import rms_norm_reference

if _runtime.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, stride_x, stride_y, eps, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        n = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        dw_part_ptr,
        M,
        H,
        stride_dy,
        stride_x,
        stride_dx,
        rows_per_prog,
        WANT_DW: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
        first = pid * rows_per_prog
        for i in range(0, rows_per_prog):
            row = (first + i).to(tl.int64)
            if row < M:
                x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
                xf = x.to(tl.float32)
                dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                dn = dy * w
                dx = rstd * (dn - xf * (rstd * rstd) * (tl.sum(dn * xf, axis=0) / H))
                tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if WANT_DW:
                    dw += dy * (xf * rstd).to(x.dtype).to(tl.float32)
        if WANT_DW:
            tl.store(dw_part_ptr + pid * H + cols, dw, mask=mask)


def _programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(m, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(m, 4))  # the interpreter: few programs, each a python loop over rows


def _warps(block_h: int) -> int:
    return min(16, max(1, block_h // 256))


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * rstd).to(x.dtype) on x (M, H); saves x, w, rstd.

    Backward derivation: with n = x * rstd, rstd = (mean(x^2) + eps)^-1/2, d rstd / dx_j = -rstd^3 x_j / H,
    so dL/dx_j = rstd * dn_j - (rstd^3 / H) * x_j * sum_i dn_i x_i, where dn = dL/dn = dy * w.
    dL/dw = sum over rows of dy * n.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        m, h = x.shape
        y = torch.empty(m, h, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_h = triton.next_power_of_2(h)
        _rms_norm_fwd_kernel[(m,)](
            x, weight, y, rstd, h, x.stride(0), y.stride(0), eps, BLOCK_H=block_h, num_warps=_warps(block_h)
        )
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        m, h = x.shape
        dy = dy.contiguous()
        want_dw = ctx.needs_input_grad[1]
        progs = _programs(m, x.device)
        rows_per_prog = triton.cdiv(m, progs)
        progs = triton.cdiv(m, rows_per_prog)
        dx = torch.empty_like(x)
        part = torch.empty(progs if want_dw else 1, h, dtype=torch.float32, device=x.device)
        block_h = triton.next_power_of_2(h)
        _rms_norm_bwd_kernel[(progs,)](
            dy,
            x,
            weight,
            rstd,
            dx,
            part,
            m,
            h,
            dy.stride(0),
            x.stride(0),
            dx.stride(0),
            rows_per_prog,
            WANT_DW=want_dw,
            BLOCK_H=block_h,
            num_warps=_warps(block_h),
        )
        dw = part.sum(0).to(weight.dtype) if want_dw else None
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,); the reference on CPU tensors."""
    if not _runtime.use_triton(x):
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = RMSNormFunction.apply(x2, weight, float(eps))
    return y.view(*x.shape[:-1], y.shape[-1])

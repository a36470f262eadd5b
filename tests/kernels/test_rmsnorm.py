"""RMSNorm kernel: output, dx and dw vs an fp64 oracle (DESIGN rule 2)."""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels.reference import rms_norm_reference
from lorafuse.kernels.rmsnorm import rms_norm


def _grads(fn, x, w, dy, eps):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy.to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad}


def _check(shape, dtype, w_dtype, device, parity, frozen_w=False):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(device)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device)
    dy = torch.randn(shape, generator=g).to(device)
    oracle = _grads(rms_norm_reference, x.double(), w.double(), dy.double(), 1e-6)
    ref = _grads(rms_norm_reference, x.to(dtype), w.to(w_dtype), dy, 1e-6)
    got = _grads(rms_norm, x.to(dtype), w.to(w_dtype), dy, 1e-6)
    for name in oracle:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
        parity(f"rmsnorm/{dtype}/{name}", got[name], ref[name], oracle[name])
    if frozen_w:  # LoRA freezes the norm: no dw work and no dw
        xf = x.to(dtype).requires_grad_()
        rms_norm(xf, w.to(w_dtype), 1e-6).sum().backward()
        assert xf.grad is not None


@pytest.mark.parametrize(
    "shape,dtype,w_dtype",
    [
        ((7, 64), torch.float32, torch.float32),
        ((3, 5, 96), torch.float16, torch.float16),  # H not a power of two, 3-D input
        ((9, 48), torch.float16, torch.float32),  # fp32 weight on fp16 activations -> fp32 output (HF)
    ],
)
def test_rms_norm_parity(shape, dtype, w_dtype, device, parity):
    _check(shape, dtype, w_dtype, device, parity, frozen_w=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (2048, 5120), (4095, 4097)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_parity_gpu(shape, dtype, parity):
    _check(shape, dtype, dtype, torch.device("cuda"), parity)

"""RoPE kernel: rotated q, k and their gradients vs an fp64 oracle; in place; GQA; broadcast tables."""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels.reference import rope_reference
from lorafuse.kernels.rope import apply_rope


def _tables(bsz, t, d, base=10000.0):
    """HF's tables: cat(freqs, freqs) of position * inv_freq, positions offset per batch row (packing-like)."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(t, dtype=torch.float64)[None, :] + 3 * torch.arange(bsz, dtype=torch.float64)[:, None]
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos(), emb.sin()


def _grads(fn, q, k, cos, sin, dq, dk):
    # rotate non-leaf copies (in place must be legal on them), differentiate w.r.t. the leaves
    q0, k0 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qr, kr = fn(q0 * 1, k0 * 1, cos, sin)
    torch.autograd.backward([qr, kr], [dq.to(qr.dtype), dk.to(kr.dtype)])
    return {"q": qr.detach(), "k": kr.detach(), "dq": q0.grad, "dk": k0.grad}


def _check(bsz, t, hq, hk, d, dtype, broadcast, device, parity):
    g = torch.Generator().manual_seed(0)
    q, dq = (torch.randn(bsz, t, hq, d, generator=g).to(device) for _ in range(2))
    k, dk = (torch.randn(bsz, t, hk, d, generator=g).to(device) for _ in range(2))
    cos, sin = _tables(1 if broadcast else bsz, t, d)
    cos, sin = cos.to(device), sin.to(device)
    oracle = _grads(rope_reference, q.double(), k.double(), cos, sin, dq.double(), dk.double())
    ref = _grads(rope_reference, q.to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype), dq, dk)
    got = _grads(apply_rope, q.to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype), dq, dk)
    for name in oracle:
        parity(f"rope/{dtype}/{name}", got[name], ref[name], oracle[name])


@pytest.mark.parametrize(
    "bsz,t,hq,hk,d,dtype,broadcast",
    [
        (2, 5, 4, 2, 16, torch.float32, False),  # GQA 4:2, one table per batch row
        (1, 7, 3, 1, 32, torch.float16, True),  # MQA, 3 heads (not a power of two), broadcast table
    ],
)
def test_rope_parity(bsz, t, hq, hk, d, dtype, broadcast, device, parity):
    _check(bsz, t, hq, hk, d, dtype, broadcast, device, parity)


def test_rope_in_place_and_on_views(device):
    """Tensors of their own are rotated in place; the (B, T, H, D) view of a projection output (where
    autograd forbids marking two dirty views) gets new tensors with the same values, and grads flow."""
    cos, sin = (x.float().to(device) for x in _tables(1, 5, 16))
    q = torch.randn(2, 5, 4, 16, device=device)
    k = torch.randn(2, 5, 2, 16, device=device)
    want = rope_reference(q, k, cos, sin)
    qr, kr = apply_rope(q, k, cos, sin)
    assert qr.data_ptr() == q.data_ptr() and kr.data_ptr() == k.data_ptr()
    assert torch.allclose(qr, want[0], atol=1e-5) and torch.allclose(kr, want[1], atol=1e-5)
    proj = torch.randn(2, 5, 6 * 16, device=device, requires_grad=True)
    y = proj * 1.0
    qv, kv = y[..., :64].view(2, 5, 4, 16), y[..., 64:].view(2, 5, 2, 16)  # strided views, as in attention
    ref = rope_reference(qv.detach().clone(), kv.detach().clone(), cos, sin)
    qr, kr = apply_rope(qv, kv, cos, sin)
    assert torch.allclose(qr, ref[0], atol=1e-5) and torch.allclose(kr, ref[1], atol=1e-5)
    (qr.sum() + kr.sum()).backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bsz,t,hq,hk,d", [(4, 512, 32, 32, 128), (2, 2048, 32, 8, 128), (3, 333, 28, 4, 128)])
def test_rope_parity_gpu(bsz, t, hq, hk, d, dtype, parity):
    _check(bsz, t, hq, hk, d, dtype, False, torch.device("cuda"), parity)

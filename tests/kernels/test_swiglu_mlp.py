"""SwiGLU elementwise kernel and the fused LoRA MLP: outputs and every gradient vs an fp64 oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafuse.kernels import lora_linear as ll
from lorafuse.kernels.reference import LoRAWeights, swiglu_mlp_reference, swiglu_reference
from lorafuse.kernels.swiglu_mlp import swiglu, swiglu_mlp
from lorafuse.options import KernelOptions
from lorafuse.quant.nf4 import quantize_nf4

DEFAULT = KernelOptions()


@pytest.mark.parametrize("shape,dtype", [((7, 48), torch.float32), ((3, 5, 33), torch.float16)])
def test_swiglu_parity(shape, dtype, device, parity):
    gen = torch.Generator().manual_seed(0)
    g, u, dh = (torch.randn(shape, generator=gen).mul(3).to(device) for _ in range(3))

    def run(fn, dt):
        a, b = g.to(dt).requires_grad_(), u.to(dt).requires_grad_()
        h = fn(a, b)
        h.backward(dh.to(dt))
        return {"h": h.detach(), "dg": a.grad, "du": b.grad}

    oracle, ref, got = run(swiglu_reference, torch.float64), run(swiglu_reference, dtype), run(swiglu, dtype)
    for name in oracle:
        parity(f"swiglu/{dtype}/{name}", got[name], ref[name], oracle[name])


def _proj(k, n, r, base, dropout, seed, device, lora=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    return LoRAWeights(
        weight=quantize_nf4(w.to(device)) if base == "nf4" else w.to(device),
        lora_A=(torch.randn(r, k, generator=gen) / k**0.5).to(device).requires_grad_() if lora else None,
        lora_B=(torch.randn(n, r, generator=gen) / r**0.5).to(device).requires_grad_() if lora else None,
        scaling=2.0,
        dropout_p=dropout,
        seed=100 + seed if dropout else None,
    )


def _as(lw: LoRAWeights, dtype, oracle=False) -> LoRAWeights:
    w = lw.weight
    if oracle:
        w = (w.dequantize(torch.float32) if lw.is_nf4 else w).double()
    elif not lw.is_nf4:
        w = w.to(dtype)
    ldt = torch.float64 if oracle else None

    def leaf(t):
        return None if t is None else t.detach().to(ldt or t.dtype).clone().requires_grad_()

    return dataclasses.replace(lw, weight=w, lora_A=leaf(lw.lora_A), lora_B=leaf(lw.lora_B))


def _run(fn, x, projs, dy, dtype):
    x = x.detach().to(dtype).requires_grad_()
    y = fn(x, *projs)
    y.backward(dy.to(dtype))
    out = {"y": y.detach(), "dx": x.grad}
    for name, lw in zip(("gate", "up", "down"), projs, strict=True):
        if lw.has_lora:
            out[f"{name}.dA"], out[f"{name}.dB"] = lw.lora_A.grad, lw.lora_B.grad
    return out


def _check(base, dropout, dtype, dims, device, parity, lora_on_up=True, opts=DEFAULT):
    m, d, f, r = dims
    projs = tuple(
        dataclasses.replace(lw, opts=opts)
        for lw in (
            _proj(d, f, r, base, dropout, 1, device),
            _proj(d, f, r, base, dropout, 2, device, lora_on_up),
            _proj(f, d, r, base, dropout, 3, device),
        )
    )
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(m, d, generator=gen).to(device), torch.randn(m, d, generator=gen).to(device)
    oracle = _run(swiglu_mlp_reference, x, [_as(p, None, True) for p in projs], dy, torch.float64)
    ref = _run(swiglu_mlp_reference, x, [_as(p, dtype) for p in projs], dy, dtype)
    got = _run(swiglu_mlp, x, [_as(p, dtype) for p in projs], dy, dtype)
    assert set(got) == set(oracle)
    for name in oracle:
        parity(f"mlp/{base}/p={dropout}/{dtype}/{name}", got[name], ref[name], oracle[name])


@pytest.mark.parametrize(
    "base,dropout,dtype,dims,lora_on_up",
    [
        ("dense", 0.0, torch.float32, (19, 32, 48, 4), False),  # up_proj without LoRA
        ("nf4", 0.1, torch.float16, (16, 32, 40, 8), True),
    ],
)
def test_swiglu_mlp_parity(base, dropout, dtype, dims, lora_on_up, device, parity):
    _check(base, dropout, dtype, dims, device, parity, lora_on_up)


def test_mlp_saves_x_e_g_and_s_only_and_refuses_second_backward(device):
    projs = [_proj(32, 48, 4, "dense", 0.0, i, device) for i in (1, 2)] + [_proj(48, 32, 4, "dense", 0.0, 3, device)]
    x = torch.randn(16, 32, device=device, requires_grad=True)
    y = swiglu_mlp(x, *projs)
    fn = y.grad_fn.next_functions[0][0]
    casts = [(4, 32), (48, 4), (4, 32), (48, 4), (4, 48), (32, 4)]  # A and s B of gate, up, down
    assert [tuple(t.shape) for t in fn.saved_tensors] == [
        (16, 32),
        (16, 48),
        (16, 48),
        (16, 4),
        (16, 4),
        (16, 4),
    ] + casts
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        y.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(2048, 4096, 11008, 16), (1000, 4096, 14336, 8)])
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_mlp_parity_gpu(dims, base, dtype, parity):
    _check(base, 0.05, dtype, dims, torch.device("cuda"), parity)


def test_without_a_graph_the_product_overwrites_the_gate_output(device, monkeypatch):
    """Under no_grad (evaluation, generation) nothing reads e again: SwiGLU writes h over it, and y is the same."""
    from lorafuse.kernels import swiglu_mlp as sm

    projs = [_proj(32, 48, 4, "dense", 0.0, i, device) for i in (1, 2)] + [_proj(48, 32, 4, "dense", 0.0, 3, device)]
    x = torch.randn(16, 32, device=device)
    outs, act = [], sm.swiglu_forward
    monkeypatch.setattr(sm, "swiglu_forward", lambda e, g, out=None: outs.append(out is e) or act(e, g, out=out))
    with_graph = swiglu_mlp(x.clone().requires_grad_(), *projs)
    with torch.no_grad():
        without = swiglu_mlp(x, *projs)
    assert outs == [False, True]
    assert torch.equal(with_graph.detach(), without)


def test_the_fused_mlp_under_a_dequantization_cap(device, monkeypatch, parity):
    """With gate, up and down over the cap, each is dequantized and multiplied in two row parts (gate/up: 256 rows
    of 64; down: 32 rows of 512, both cuts at NF4's nested-block alignment): outputs and gradients match the oracle
    as the whole-weight path does, and the shared buffer holds one part at a time."""
    monkeypatch.setattr(ll, "_BUFFERS", {})  # each weight is 64 KiB in fp16, over a 48 KiB cap
    _check("nf4", 0.0, torch.float16, (16, 64, 512, 4), device, parity, opts=KernelOptions(dequant_cap_bytes=48 << 10))
    (buf,) = ll._BUFFERS.values()
    assert buf.numel() == 256 * 64 * 2 == 32 * 512 * 2  # bytes of fp16

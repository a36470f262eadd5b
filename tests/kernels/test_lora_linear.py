"""Fused LoRA / QLoRA linear: output and every gradient vs an fp64 oracle (DESIGN rules 2 and 3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafuse.kernels import lora_linear as ll
from lorafuse.kernels.lora_gemm import keep_mask
from lorafuse.kernels.reference import LoRAWeights, dropout_keep_mask_reference, lora_linear_reference
from lorafuse.options import KernelOptions
from lorafuse.quant.nf4 import quantize_nf4

DEFAULT = KernelOptions()

ALIGNED, ODD = (32, 64, 32, 16), (19, 45, 37, 5)  # (M tokens, K in, N out, r)


def _problem(shape, base, dropout, bias_grad, device, seed=0):
    """Random operands on `device` in fp32: x (M, K), a LoRAWeights, and an upstream gradient."""
    m, k, n, r = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    lw = LoRAWeights(
        weight=quantize_nf4(w.to(device)) if base == "nf4" else w.to(device),
        bias=(torch.randn(n, generator=g) * 0.1).to(device).requires_grad_(bias_grad),
        lora_A=(torch.randn(r, k, generator=g) / k**0.5).to(device).requires_grad_(),
        lora_B=(torch.randn(n, r, generator=g) / r**0.5).to(device).requires_grad_(),  # nonzero: a trained B
        scaling=2.0,
        dropout_p=dropout,
        seed=1234 if dropout else None,
    )
    x = torch.randn(m, k, generator=g).to(device)
    dy = torch.randn(m, n, generator=g).to(device)
    return x, lw, dy


def _cast(lw: LoRAWeights, dtype) -> LoRAWeights:
    """The same layer with the base in `dtype` (LoRA masters keep their dtype, as in training)."""
    w = lw.weight if lw.is_nf4 else lw.weight.detach().to(dtype)
    return dataclasses.replace(
        lw,
        weight=w,
        bias=lw.bias.detach().to(dtype).requires_grad_(lw.bias.requires_grad),
        lora_A=lw.lora_A.detach().clone().requires_grad_(),
        lora_B=lw.lora_B.detach().clone().requires_grad_(),
    )


def _oracle_lw(lw: LoRAWeights) -> LoRAWeights:
    """fp64 copy; an NF4 base becomes its fp32 dequantization (QLoRA == LoRA on the dequantized weight)."""
    w = lw.weight.dequantize(torch.float32) if lw.is_nf4 else lw.weight
    out = _cast(dataclasses.replace(lw, weight=w.double()), torch.float64)
    out.lora_A = out.lora_A.detach().double().requires_grad_()
    out.lora_B = out.lora_B.detach().double().requires_grad_()
    return out


def _run(fn, x, lw, dy, dtype):
    x = x.detach().to(dtype).requires_grad_()
    y = fn(x, lw)
    y.backward(dy.to(dtype))
    grads = {"y": y.detach(), "dx": x.grad, "dA": lw.lora_A.grad, "dB": lw.lora_B.grad}
    if lw.bias.requires_grad:
        grads["db"] = lw.bias.grad
    return grads


CASES = [  # (base, dropout, dtype, shape, trainable bias): every feature in a few interpreter runs
    ("dense", 0.0, torch.float32, ALIGNED, False),
    ("dense", 0.25, torch.float16, ODD, False),
    ("dense", 0.0, torch.float16, ALIGNED, True),
    ("nf4", 0.0, torch.float32, ODD, False),
    ("nf4", 0.25, torch.float16, ALIGNED, False),
    ("nf4", 0.25, torch.float32, ALIGNED, True),
]


def _check(base, dropout, dtype, shape, bias_grad, device, parity, opts=DEFAULT):
    x, lw, dy = _problem(shape, base, dropout, bias_grad, device)
    lw = dataclasses.replace(lw, opts=opts)
    oracle = _run(lora_linear_reference, x, _oracle_lw(lw), dy, torch.float64)
    ref = _run(lora_linear_reference, x, _cast(lw, dtype), dy, dtype)
    got = _run(ll.lora_linear, x, _cast(lw, dtype), dy, dtype)
    assert set(got) == set(oracle)
    for name in oracle:
        assert got[name].dtype == ref[name].dtype, name
        parity(f"{base}/p={dropout}/{dtype}/{name}", got[name], ref[name], oracle[name])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-p{c[1]}-{str(c[2])[6:]}-{c[3][0]}")
def test_lora_linear_parity(case, device, parity):
    _check(*case, device, parity)


def test_fused_ds_db_one_pass(device, parity):
    """dS and dB from one read of dY: several row tiles and column splits, odd sizes; then the whole
    layer with the kernel switched on."""
    from lorafuse.kernels.lora_grad_sb import grad_s_b

    g = torch.Generator().manual_seed(5)
    dy, s, b = (torch.randn(shape, generator=g).to(device) for shape in [(37, 600), (37, 5), (600, 5)])
    for dtype in (torch.float32, torch.float16):
        ds, db = grad_s_b(dy.to(dtype), s.to(dtype), (b * 2.0).to(dtype), 2.0)
        want_ds, want_db = dy.double() @ (b.double() * 2.0), 2.0 * dy.double().t() @ s.double()
        ref_ds = dy.to(dtype) @ (b * 2.0).to(dtype)
        ref_db = 2.0 * (dy.to(dtype).t() @ s.to(dtype)).float()
        parity(f"grad_s_b/{dtype}/dS", ds, ref_ds, want_ds)
        parity(f"grad_s_b/{dtype}/dB", db, ref_db, want_db)
    _check("nf4", 0.0, torch.float16, ODD, False, device, parity, KernelOptions(fused_ds_db=True))


def test_dropout_mask_matches_reference(device):
    got = keep_mask(99, 37, 45, 0.3, device)
    assert torch.equal(got.cpu(), dropout_keep_mask_reference(99, 37, 45, 0.3))
    assert abs(got.float().mean().item() - 0.7) < 0.05
    assert not torch.equal(got, keep_mask(100, 37, 45, 0.3, device)), "a new seed must give a new mask"


def test_saves_only_x_and_s(device, monkeypatch):
    """The memory claim: backward keeps x, the (M, r) S and the forward's casts of A (r, K) and s B (N, r) in the
    compute dtype (so the backward casts nothing), nothing of size M x N or N x K."""
    x, lw, _ = _problem(ALIGNED, "nf4", 0.25, False, device)
    x.requires_grad_()
    y = ll.lora_linear(x, lw)
    fn = y.grad_fn.next_functions[0][0]  # under the reshape back to (..., N)
    assert type(fn).__name__ == "LoRALinearFunctionBackward"
    saved = fn.saved_tensors
    r = lw.lora_A.shape[0]
    assert [tuple(t.shape) for t in saved] == [
        tuple(x.shape),
        (x.shape[0], r),
        tuple(lw.lora_A.shape),
        tuple(lw.lora_B.shape),
    ]
    assert saved[0].data_ptr() == x.data_ptr()
    assert torch.equal(saved[2], lw.lora_A.to(x.dtype))
    assert torch.equal(saved[3], (lw.lora_B.float() * lw.scaling).to(x.dtype))


def test_autocast_does_not_change_the_op(device, monkeypatch):
    """The training loop runs under autocast; the fused op keeps its own dtypes (x.dtype) regardless."""
    x, lw, dy = _problem(ODD, "dense", 0.0, False, device)
    lw = _cast(lw, torch.float16)
    plain = _run(ll.lora_linear, x, lw, dy, torch.float16)
    lw = _cast(lw, torch.float16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        under = _run(ll.lora_linear, x, lw, dy, torch.float16)
    for name in plain:
        assert torch.equal(plain[name], under[name]), name


GPU_SHAPES = [(2048, 4096, 4096, 16), (2048, 4096, 11008, 16), (2048, 11008, 4096, 16), (1000, 4095, 4097, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_linear_parity_gpu(shape, base, dropout, dtype, parity):
    _check(base, dropout, dtype, shape, False, torch.device("cuda"), parity)


def test_device_seed_mask_matches_reference(device):
    """A DropoutSeed is hashed by the kernel from its base tensor (read on the device) and its offset; the
    mask equals the reference's for the same integer seed, and advancing the base changes it."""
    from lorafuse.kernels.reference import DropoutSeed

    base = torch.tensor(41, dtype=torch.int64, device=device)
    seed = DropoutSeed(base, 5)
    got = keep_mask(seed, 37, 45, 0.3, device)
    assert torch.equal(got.cpu(), dropout_keep_mask_reference(seed.value(), 37, 45, 0.3))
    assert seed.value() == (41 * 0x61C88647 + 5) % 2**32
    base.add_(1)
    assert not torch.equal(got, keep_mask(seed, 37, 45, 0.3, device)), "a new base must give a new mask"
    assert not torch.equal(got, keep_mask(DropoutSeed(torch.tensor(41, device=device), 6), 37, 45, 0.3, device))
    big = DropoutSeed(torch.tensor(2**40 + 3, dtype=torch.int64, device=device), 2)  # bases wrap mod 2**32
    assert torch.equal(keep_mask(big, 8, 8, 0.5, device).cpu(), dropout_keep_mask_reference(big.value(), 8, 8, 0.5))


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_lora_linear_with_a_device_seed(base, device, parity):
    """The fast path's seeds (DropoutSeed: a base on the device + a module offset) through every dropout
    kernel (down-projection, dA, the masked dS A term): same results as the reference with that seed."""
    from lorafuse.kernels.reference import DropoutSeed

    x, lw, dy = _problem(ODD, base, 0.25, False, device)
    lw = dataclasses.replace(lw, seed=DropoutSeed(torch.tensor(77, dtype=torch.int64, device=device), 3))
    oracle = _run(lora_linear_reference, x, _oracle_lw(lw), dy, torch.float64)
    ref = _run(lora_linear_reference, x, _cast(lw, torch.float32), dy, torch.float32)
    got = _run(ll.lora_linear, x, _cast(lw, torch.float32), dy, torch.float32)
    for name in oracle:
        parity(f"device-seed/{base}/{name}", got[name], ref[name], oracle[name])
    other = _run(
        ll.lora_linear,
        x,
        _cast(dataclasses.replace(lw, seed=DropoutSeed(lw.seed.base, 4)), torch.float32),
        dy,
        torch.float32,
    )
    assert not torch.equal(other["y"], got["y"]), "another module offset, another mask"


@pytest.mark.gpu
def test_weight_grads_come_out_of_the_gemm_in_fp32():
    """On CUDA the LoRA weight gradients (dA, and dB with the LoRA scaling as the GEMM's alpha) are written in
    fp32 straight from the accumulator: no cast kernel, and closer to the exact product than rounding it to bf16
    first (the CPU path's numbers)."""
    from lorafuse.kernels import _runtime

    dev = torch.device("cuda")
    assert _runtime.gemm_fp32_out(dev), "torch on this GPU lacks mm/addmm with out_dtype"
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(16, 2048, device=dev, generator=g).bfloat16()
    b = torch.randn(2048, 4096, device=dev, generator=g).bfloat16()
    for alpha in (1.0, 2.0, 0.7):
        exact = (a.double() @ b.double()) * alpha
        got = ll.weight_grad(a, b, torch.float32, alpha)
        rounded = (a @ b).float() * alpha
        assert got.dtype == torch.float32
        err, err_rounded = [float((t.double() - exact).norm() / exact.norm()) for t in (got, rounded)]
        assert err < err_rounded / 10, (alpha, err, err_rounded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_dequantization_cap_splits_the_weight_into_row_parts(dtype, device, monkeypatch, parity):
    """Under a dequantization cap (train.dequant_cap_mib) an NF4 weight larger than the cap is dequantized and
    multiplied in row parts
    (forward: column blocks of y; backward: dY W summed over the parts): output and gradients match the oracle as
    the whole-weight path does, and the shared buffer never holds more than one part."""
    shape = (16, 64, 512, 4)  # 512 rows: two 256-row cuts (double quantization aligns cuts to 256 x 64 elements)
    x, lw, dy = _problem(shape, "nf4", 0.0, False, device)
    elem = torch.finfo(dtype).bits // 8
    cap = 64 * 512 * elem * 2 // 3
    assert ll.dequant_rows(512, 64 * 512, lw.weight.row_alignment(), elem, cap) == 256
    lw = dataclasses.replace(lw, opts=KernelOptions(dequant_cap_bytes=cap))
    monkeypatch.setattr(ll, "_BUFFERS", {})
    oracle = _run(lora_linear_reference, x, _oracle_lw(lw), dy, torch.float64)
    ref = _run(lora_linear_reference, x, _cast(lw, dtype), dy, dtype)
    got = _run(ll.lora_linear, x, _cast(lw, dtype), dy, dtype)
    for name in oracle:
        parity(f"nf4/cap/{dtype}/{name}", got[name], ref[name], oracle[name])
    (buf,) = ll._BUFFERS.values()
    assert buf.numel() == 256 * 64 * elem < lw.weight.numel * elem  # bytes


def test_nf4_rows_view_the_weight_and_refuse_misaligned_cuts():
    w = quantize_nf4(torch.randn(512, 64))
    step = w.row_alignment()
    assert step == 256  # 256 nested blocks of 64 elements = 16384 elements = 256 rows of 64
    full = w.dequantize(torch.float32)
    assert torch.equal(w.rows(256, 512).dequantize(torch.float32), full[256:])
    assert w.rows(0, 256).packed.data_ptr() == w.packed.data_ptr()  # a view, no copy
    with pytest.raises(ValueError, match="multiples of 256"):
        w.rows(128, 512)

"""FP8 GEMMs (kernels/fp8.py, train.fp8): quantization within e4m3's bounds, the projections' assembly against an
emulation, the backward's dX in FP8 (against the same step with a bf16 backward), the shared quantization of q|k|v
and gate|up, and the GPU kernels bit for bit against their references. Each projection's operands carry the run's
KernelOptions (`opts.fp8`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafuse.kernels import _runtime, fp8
from lorafuse.kernels import lora_linear as ll
from lorafuse.kernels.reference import LoRAWeights
from lorafuse.kernels.swiglu_mlp import swiglu_mlp
from lorafuse.options import KernelOptions
from lorafuse.quant.nf4 import quantize_nf4

ULP_E4M3 = 2.0**-3  # e4m3 keeps 3 mantissa bits: a normal value rounds within half of 2^-3 of itself, relatively
SUBNORMAL_STEP = 2.0**-9  # e4m3's smallest step (subnormals), in units of the scale (448 = 2^8 * 1.75)


FP8 = KernelOptions(fp8=True)


@pytest.fixture
def bf16_backward(monkeypatch):
    """The same FP8 forward with the backward's dX in bf16: the reference the FP8 backward is compared with."""
    monkeypatch.setattr(fp8, "backward_applies", lambda dy, lw: False)


def _within_e4m3(approx: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
    """Element by element: |approx - exact| <= half an e4m3 step (relative for normals, absolute for subnormals)."""
    err = (approx.double() - exact.double()).abs()
    bound = exact.double().abs() * ULP_E4M3 / 2 + scale.double() * SUBNORMAL_STEP / 2
    assert bool((err <= bound).all()), f"worst excess {float((err - bound).max()):.3g}"


def test_rows_quantize_within_half_an_e4m3_step_and_keep_their_largest_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 96, generator=g)
    x[:, ::17] *= 60  # outlier channels, as LLM activations have
    x[5] = 0  # a zero row: codes 0, a positive scale
    x = x.to(torch.bfloat16)
    q, s = fp8.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and s.shape == (33, 1) and bool((s > 0).all())
    amax = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(s[amax > 0], (amax / 448)[amax > 0]), "the scale maps each row's largest value to 448"
    _within_e4m3(q.double() * s.double(), x, s)
    big = x.float().abs().argmax(dim=1)
    rows = torch.arange(33)
    nonzero = rows != 5
    assert torch.equal(q.float()[rows, big].abs()[nonzero], torch.full((32,), 448.0))
    assert bool((q[5].float() == 0).all())


@pytest.mark.parametrize("shape", [(7, 100), (3, 4500)])  # one block per row, and rows over several blocks
def test_the_row_quantization_kernel_computes_the_reference_codes(shape, device):
    """Into an fp32 output, where the interpreter rounds right: the unrounded codes and the scales bit for bit."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(13)) * 5
    x[1] = 0
    x = x.to(device)
    codes, scale = fp8._quantize_rows_kernel(x, out=torch.empty(shape, device=device))
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    assert torch.equal(scale, amax / 448)
    assert torch.equal(codes, (x * (torch.full_like(amax, 448) / amax)).clamp(-448, 448))


def test_nf4_row_scales_are_each_rows_largest_weight_over_448():
    w = quantize_nf4(torch.randn(48, 256, generator=torch.Generator().manual_seed(1)))
    dense = w.dequantize(torch.float32)
    assert torch.equal(fp8.nf4_row_scales(w), dense.abs().amax(dim=1) / 448)
    assert fp8.nf4_row_scales(w) is fp8.nf4_row_scales(w), "cached on the frozen weight"


def test_nf4_decodes_to_e4m3_within_half_a_step_of_the_dequantized_weight():
    w = quantize_nf4(torch.randn(48, 256, generator=torch.Generator().manual_seed(2)))
    sw = fp8.nf4_row_scales(w)
    out = torch.empty(w.numel, dtype=fp8.E4M3)
    w8 = fp8.nf4_to_fp8(w, out, sw)
    assert w8.shape == (48, 256) and w8.data_ptr() == out.data_ptr()
    _within_e4m3(w8.double() * sw.double()[:, None], w.dequantize(torch.float32), sw[:, None])


@pytest.mark.parametrize("shape", [(64, 256), (24, 192)])  # whole programs (unmasked), and a masked tail
def test_the_dequantization_kernel_divides_by_row_scales_in_the_reference_order(shape, device):
    """The ROW_SCALE launch (what writes e4m3 on a GPU) into an fp32 output, where the interpreter rounds right:
    bit for bit the reference's W / s_w, and clamped where a row scale is made too small."""
    from lorafuse.kernels.nf4_dequant import _launch

    w = quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(12))).to(device)
    sw = fp8.nf4_row_scales(w).clone()
    sw[3] /= 2  # this row's largest weights now exceed the limit: clamped
    out = torch.empty(w.numel, dtype=torch.float32, device=device)
    _launch(w, out, row_scale=sw)
    want = fp8.nf4_scaled_reference(w.to("cpu"), sw.cpu(), float(torch.finfo(torch.float32).max))
    limit = fp8.nf4_scaled_reference(w.to("cpu"), sw.cpu(), 448.0)
    assert torch.equal(out.view(shape).cpu(), want)
    assert float(want[3].abs().max()) > 448 and float(limit[3].abs().max()) == 448


def _lw(
    base: str, n: int, k: int, device, r: int = 8, bias: bool = True, seed: int = 0, opts: KernelOptions = FP8
) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    return LoRAWeights(
        weight=quantize_nf4(w).to(device) if base == "nf4" else w.to(device, torch.bfloat16),
        bias=(torch.randn(n, generator=g) * 0.1).to(device, torch.bfloat16) if bias else None,
        lora_A=(torch.randn(r, k, generator=g) / k**0.5).to(device).requires_grad_(),
        lora_B=(torch.randn(n, r, generator=g) / r**0.5).to(device).requires_grad_(),
        scaling=2.0,
        opts=opts,
    )


def _move(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


def _cpu(lw: LoRAWeights) -> LoRAWeights:
    return dataclasses.replace(
        lw,
        weight=lw.weight.to("cpu") if lw.is_nf4 else _move(lw.weight),
        bias=_move(lw.bias),
        lora_A=_move(lw.lora_A),
        lora_B=_move(lw.lora_B),
    )


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want).norm() / want.norm())


def _emulated(x: torch.Tensor, lw: LoRAWeights) -> torch.Tensor:
    """fp64 on the CPU: (x8 W8^T) s_x s_w^T + b + s (x A^T) B^T, with the codes of fp8's quantizers (tested above)."""
    x, lw = x.detach().cpu(), _cpu(lw)
    x8, sx = fp8.quantize_rows_reference(x)
    if lw.is_nf4:
        sw = fp8.nf4_row_scales(lw.weight)
        w8 = fp8.nf4_to_fp8(lw.weight, torch.empty(lw.weight.numel, dtype=fp8.E4M3), sw)
    else:
        w8, sw = fp8.quantize_rows_reference(lw.weight)
    y = (x8.double() @ w8.double().t()) * sx.double() * sw.double().view(1, -1)
    if lw.bias is not None:
        y = y + lw.bias.double()
    return y + lw.scaling * (x.double() @ lw.lora_A.detach().double().t()) @ lw.lora_B.detach().double().t()


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_the_fp8_forward_is_the_scaled_product_of_the_codes(base, device, monkeypatch):
    """y = lora_linear(x) with train.fp8 equals the fp64 emulation of the codes' product within bf16 output rounding
    (the base GEMM's result and the LoRA addmm_ each round once: 2 x 2^-9), through one FP8 GEMM."""
    calls = []
    scaled_mm = fp8.scaled_mm
    monkeypatch.setattr(fp8, "scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
    lw = _lw(base, 48, 128, device)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    y = ll.lora_linear(x, lw)
    assert len(calls) == 1
    assert _rel(y, _emulated(x, lw)) <= 2 * 2.0**-9
    # against the exact product of the bf16 inputs: two independent e4m3 roundings, each <= 2^-4 and ~2^-4 / sqrt(3)
    # in RMS, so ~5% together
    w = lw.weight.dequantize(torch.float32) if lw.is_nf4 else lw.weight
    exact = _cpu(dataclasses.replace(lw, weight=w))
    exact = (
        x.double().cpu() @ exact.weight.double().t()
        + exact.bias.double()
        + 2.0 * (x.double().cpu() @ exact.lora_A.double().t()) @ exact.lora_B.double().t()
    )
    assert 2.0**-8 < _rel(y, exact) < 0.06


def test_on_a_16bit_weight_fp8_changes_the_forward_only(device):
    """A bf16 base's dX stays bf16 (FP8 decodes NF4 weights only), so with FP8 on S = x A^T and every gradient for a
    given dY are the bf16 path's, while the forward's base product changed."""
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    dy = torch.randn(40, 48, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    runs = {}
    for on in (False, True):
        lw = _lw("dense", 48, 128, device, opts=KernelOptions(fp8=on))
        a = lw.lora_A.detach().clone().requires_grad_()
        b = lw.lora_B.detach().clone().requires_grad_()
        xi = x.clone().requires_grad_()
        y = ll.lora_linear(xi, dataclasses.replace(lw, lora_A=a, lora_B=b))
        y.backward(dy)
        runs[on] = (y.detach(), xi.grad, a.grad, b.grad)
    assert not torch.equal(runs[True][0], runs[False][0]), "the forward did change"
    for name, g_on, g_off in zip(("dx", "dA", "dB"), runs[True][1:], runs[False][1:]):
        assert torch.equal(g_on, g_off), name


def test_q_k_v_share_one_quantization_of_their_input(device, monkeypatch):
    quantized = []
    quantize = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x, *a: quantized.append(x.shape) or quantize(x, *a))
    specs = [_lw("nf4", n, 64, device, seed=i) for i, n in enumerate((64, 32, 32))]
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(6)).to(device, torch.bfloat16)
    ys = ll.lora_linears(x, specs)
    assert quantized == [(16, 64)]
    for y, lw in zip(ys, specs):
        assert _rel(y.reshape(16, -1), _emulated(x.reshape(16, 64), lw)) <= 2 * 2.0**-9


def test_the_mlp_quantizes_x_once_for_gate_and_up_and_skips_down_in_the_recompute(device, monkeypatch):
    quantized, gemms = [], []
    quantize, scaled_mm = fp8.quantize_rows, fp8.scaled_mm
    monkeypatch.setattr(fp8, "quantize_rows", lambda x, *a: quantized.append(tuple(x.shape)) or quantize(x, *a))
    monkeypatch.setattr(fp8, "scaled_mm", lambda *a, **k: gemms.append(tuple(a[2].shape)) or scaled_mm(*a, **k))
    gate, up, down = (_lw("nf4", n, k, device, seed=i) for n, k, i in ((128, 64, 7), (128, 64, 8), (64, 128, 9)))
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(10)).to(device, torch.bfloat16)
    y = swiglu_mlp(x, gate, up, down)
    assert quantized == [(24, 64), (24, 128)] and gemms == [(128, 64), (128, 64), (64, 128)]
    # the emulation composed from single projections; the interpreter truncates bf16 stores (<= 2^-7 each)
    e, g = _emulated(x, gate), _emulated(x, up)
    h = (torch.nn.functional.silu(e) * g).to(torch.bfloat16)
    want = _emulated(h, down)
    tol = 2.0**-6 if _runtime.INTERPRET else 4 * 2.0**-9
    assert _rel(y, want) <= tol
    quantized.clear(), gemms.clear()
    with _runtime.recomputing():
        swiglu_mlp(x, gate, up, down)
    assert quantized == [(24, 64)] and gemms == [(128, 64), (128, 64)]


def test_under_a_dequantization_cap_the_fp8_rows_come_in_parts_with_the_same_result(device, monkeypatch):
    lw = _lw("nf4", 512, 64, device)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(11)).to(device, torch.bfloat16)
    whole = ll.lora_linear(x, lw)
    parts = []
    to_fp8 = fp8.nf4_to_fp8
    monkeypatch.setattr(fp8, "nf4_to_fp8", lambda w, out, s: parts.append(w.shape[0]) or to_fp8(w, out, s))
    capped = dataclasses.replace(lw, opts=KernelOptions(fp8=True, dequant_cap_bytes=64 * 512 * 2 // 3))
    assert torch.equal(ll.lora_linear(x, capped), whole)  # 2/3 of the e4m3 weight: two 256-row parts
    assert parts == [256, 256]


def test_fp8_is_off_where_the_options_shapes_or_dtype_do_not_allow_it():
    n48, n40 = _lw("dense", 48, 64, "cpu"), _lw("dense", 40, 64, "cpu")
    assert fp8.applies(torch.empty(4, 64, dtype=torch.bfloat16), n48)
    assert not fp8.applies(torch.empty(4, 64, dtype=torch.bfloat16), _lw("dense", 48, 64, "cpu", opts=KernelOptions()))
    assert not fp8.applies(torch.empty(4, 60, dtype=torch.bfloat16), n48), "K not a multiple of 16"
    assert not fp8.applies(torch.empty(4, 64, dtype=torch.bfloat16), n40), "N not a multiple of 16"
    assert not fp8.applies(torch.empty(4, 64, dtype=torch.float16), n48), "row-wise scales write bf16 only"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(2048, 4096), (37, 11008), (5, 80)])
def test_gpu_row_quantization_is_the_reference_bit_for_bit(shape):
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 3
    x[:, 1] *= 100
    q, s = fp8.quantize_rows(x)
    q_ref, s_ref = fp8.quantize_rows_reference(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transposed", [False, True])  # the forward's layout, the backward's (K, N)
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (64, 11008), (80, 192)])
def test_gpu_nf4_decodes_to_e4m3_as_the_reference_bit_for_bit(shape, transposed):
    decode = fp8.nf4_to_fp8_t if transposed else fp8.nf4_to_fp8
    w = quantize_nf4(torch.randn(*shape, device="cuda") * 0.02)
    sw = fp8.nf4_row_scales(w)
    got = decode(w, torch.empty(w.numel, dtype=fp8.E4M3, device="cuda"), sw)
    want = decode(w.to("cpu"), torch.empty(w.numel, dtype=fp8.E4M3), sw.cpu())
    assert got.shape == (shape[::-1] if transposed else shape)
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_linear_at_a_7b_shape_is_the_codes_product_and_near_the_exact_one(monkeypatch):
    """2048 x 4096 -> 11008 (Llama-2-7B's gate): within bf16 rounding of the emulation, and its error against the
    exact bf16-input product within e4m3's: ~2^-4 per operand, accumulated as independent roundings (< 6%)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(11008, 4096, device="cuda", generator=g) * 0.02
    lw = LoRAWeights(
        quantize_nf4(w),
        None,
        torch.randn(16, 4096, device="cuda", generator=g) * 0.01,
        torch.randn(11008, 16, device="cuda", generator=g) * 0.01,
        2.0,
        opts=FP8,
    )
    x = torch.randn(2048, 4096, device="cuda", generator=g).to(torch.bfloat16)
    y = ll.lora_linear(x, lw)
    assert _rel(y, _emulated(x, lw)) <= 2 * 2.0**-9
    exact = (
        x.double() @ lw.weight.dequantize(torch.float32).double().t()
        + 2.0 * (x.double() @ lw.lora_A.double().t()) @ lw.lora_B.double().t()
    )
    assert _rel(y, exact.cpu()) < 0.06


# --- the FP8 backward: dX of NF4 weights with train.fp8 ----------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 128), (80, 192), (512, 64)])  # whole tiles; masked edges; cut in two
def test_the_transposed_decode_writes_the_forward_codes_transposed(shape, device):
    """Into an fp32 output, where the interpreter rounds right: bit for bit the reference's (W / s_w)^T, the values the
    forward's ROW_SCALE launch writes untransposed; also for a row part of a weight (the dequantization cap's cut)."""
    w = quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(14))).to(device)
    sw = fp8.nf4_row_scales(w)
    big = float(torch.finfo(torch.float32).max)
    step = w.row_alignment()
    cuts = [(w, sw)] + ([(w.rows(step, shape[0]), sw[step:])] if step < shape[0] else [])
    assert len(cuts) == (2 if shape == (512, 64) else 1)
    for part, scales in cuts:
        out = torch.empty(part.numel, dtype=torch.float32, device=device)
        fp8._nf4_t_launch(part, out, scales)
        want = fp8.nf4_scaled_reference(part.to("cpu"), scales.cpu(), big).t()
        assert torch.equal(out.view(part.shape[1], part.shape[0]).cpu(), want)


def test_the_row_quantization_kernel_scales_columns_first(device):
    x = (torch.randn(5, 300, generator=torch.Generator().manual_seed(15)) * 3).to(device)
    cs = (torch.rand(300, generator=torch.Generator().manual_seed(16)) + 0.1).to(device)
    codes, scale = fp8._quantize_rows_kernel(x, out=torch.empty(5, 300, device=device), col_scale=cs)
    xs = x * cs
    amax = xs.abs().amax(dim=1, keepdim=True)
    assert torch.equal(scale, amax / 448)
    assert torch.equal(codes, (xs * (torch.full_like(amax, 448) / amax)).clamp(-448, 448))


def _grads(lw: LoRAWeights, x: torch.Tensor, dy: torch.Tensor):
    a = lw.lora_A.detach().clone().requires_grad_()
    b = lw.lora_B.detach().clone().requires_grad_()
    xi = x.clone().requires_grad_()
    ll.lora_linear(xi, dataclasses.replace(lw, lora_A=a, lora_B=b)).backward(dy)
    return xi.grad, a.grad, b.grad


def test_the_fp8_backward_is_the_scaled_product_of_the_codes_and_leaves_da_db_alone(device, monkeypatch):
    """dX = q(dY s_w) W8 s_dY + drop'(dS A) against its fp64 emulation, within bf16 rounding (the FP8 GEMM's output
    and the LoRA addmm_ each round once), and within e4m3's error of the exact dY W; dA and dB are the bf16 path's
    (they read dY and S, not dX)."""
    lw = _lw("nf4", 48, 128, device, bias=False)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(17)).to(device, torch.bfloat16)
    dy = torch.randn(40, 48, generator=torch.Generator().manual_seed(18)).to(device, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(fp8, "backward_applies", lambda dy, lw: False)
        off = _grads(lw, x, dy)
    calls = []
    grad_input = fp8.grad_input
    monkeypatch.setattr(fp8, "grad_input", lambda *a, **k: calls.append(1) or grad_input(*a, **k))
    on = _grads(lw, x, dy)
    assert len(calls) == 1
    assert torch.equal(on[1], off[1]) and torch.equal(on[2], off[2])
    cpu = _cpu(lw)
    sw = fp8.nf4_row_scales(cpu.weight)
    w8 = fp8.nf4_to_fp8(cpu.weight, torch.empty(cpu.weight.numel, dtype=fp8.E4M3), sw)
    d8, sd = fp8.quantize_rows_reference(dy.cpu(), col_scale=sw)
    a_c = cpu.lora_A.to(torch.bfloat16).double()
    b_s = (cpu.lora_B * cpu.scaling).to(torch.bfloat16).double()
    lora = (dy.cpu().double() @ b_s) @ a_c
    want = (d8.double() @ w8.double()) * sd.double() + lora
    assert _rel(on[0], want) <= 2 * 2.0**-9
    exact = dy.cpu().double() @ cpu.weight.dequantize(torch.float32).double() + lora
    assert 2.0**-8 < _rel(on[0], exact) < 0.06


def test_the_fp8_backward_through_the_mlp_and_a_dequantization_cap(device, monkeypatch):
    """gate and up accumulate into one dX, down's dX feeds SwiGLU's backward, and under a cap every weight is
    decoded in two transposed row parts: dX within e4m3's error of the bf16 backward's, one FP8 GEMM per part."""
    gate, up, down = (_lw("nf4", n, k, device, seed=i) for n, k, i in ((512, 64, 19), (512, 64, 20), (64, 512, 21)))
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(22)).to(device, torch.bfloat16)

    def dx(*lws):
        xi = x.clone().requires_grad_()
        swiglu_mlp(xi, *lws).float().square().sum().backward()
        return xi.grad

    with monkeypatch.context() as m:
        m.setattr(fp8, "backward_applies", lambda dy, lw: False)
        ref = dx(gate, up, down)
    parts = []
    decode = fp8.nf4_to_fp8_t
    monkeypatch.setattr(fp8, "nf4_to_fp8_t", lambda w, out, s: parts.append(tuple(w.shape)) or decode(w, out, s))
    capped = KernelOptions(fp8=True, dequant_cap_bytes=64 * 512 * 2 // 3)  # 2/3 of each e4m3 weight: two parts each
    got = dx(*(dataclasses.replace(lw, opts=capped) for lw in (gate, up, down)))
    assert parts == [(32, 512), (32, 512), (256, 64), (256, 64), (256, 64), (256, 64)]  # down, gate, up
    assert 2.0**-8 < _rel(got, ref.double().cpu()) < 0.06


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_grad_input_at_a_7b_shape():
    """dY (2048 x 11008) W (11008 x 4096, NF4), Llama-2-7B's down_proj backward: within bf16 rounding of the codes'
    product, and within e4m3's error of the exact one."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w = quantize_nf4(torch.randn(4096, 11008, device="cuda", generator=g) * 0.02)
    dy = torch.randn(2048, 4096, device="cuda", generator=g).to(torch.bfloat16)
    sw = fp8.nf4_row_scales(w)
    w8t = fp8.nf4_to_fp8_t(w, torch.empty(w.numel, dtype=fp8.E4M3, device="cuda"), sw)
    got = fp8.grad_input(dy, w8t, sw)
    d8, sd = fp8.quantize_rows_reference(dy, col_scale=sw)
    want = (d8.double() @ w8t.double().t()) * sd.double()
    assert _rel(got, want.cpu()) <= 2.0**-9 * 2
    exact = dy.double() @ w.dequantize(torch.float32).double()
    assert _rel(got, exact.cpu()) < 0.06

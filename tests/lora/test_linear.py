"""LoRALinear / NF4Linear / nf4_linear: formula, init, dropout, DoRA, merge, peft parity, QLoRA == LoRA.

Tolerance rule (DESIGN style 2/3): a result computed in dtype d is compared with an fp64 reference on the same
(d-rounded) inputs, and its error must be at most 2x the error of a plain reference computed in d. No atol.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.errors import LorafuseError
from lorafuse.lora.linear import LoRALinear, NF4Linear, nf4_linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 96), (40, 33)]  # (in, out): an aligned shape and an odd one (partial last NF4 block)
# the keys bitsandbytes' Linear4bit stores for a double-quantized NF4 weight (research/formats.md 2.4)
BNB_KEYS = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
)


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def _check(name: str, got: torch.Tensor, ref64: torch.Tensor, same_dtype_ref: torch.Tensor, k: float = 2.0):
    e, e_ref = _err(got, ref64), _err(same_dtype_ref, ref64)
    print(f"{name}: err={e:.3e} same-dtype-ref err={e_ref:.3e} |got-ref_d|={_err(got, same_dtype_ref):.3e}")
    assert e <= k * e_ref, f"{name}: error {e:.3e} > {k} x same-dtype reference error {e_ref:.3e}"


def _layer(in_f, out_f, dtype=torch.float32, r=8, alpha=16, bias=True, seed=0, **kw) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    layer = LoRALinear(w, b, r=r, alpha=alpha, **kw)
    with torch.no_grad():  # random non-zero B (and a perturbed magnitude) so every LoRA term matters
        layer.lora_B.weight.copy_(torch.randn(out_f, r, generator=g) * 0.1)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(out_f, generator=g))
    return layer


def _formula(x, w, b, a, bb, s, m=None, drop=None):
    """The LoRA / DoRA layer output, evaluated in the dtype of its arguments.

    y = x W^T + b + s (x_d A^T) B^T                                   (LoRA)
    y = x W^T + b + (g - 1) (x_d W^T) + g s (x_d A^T) B^T,  g = m / ||W + s B A||_row (detached)   (DoRA)
    x_d = x * drop (the scaled dropout mask) or x.
    """
    xd = x if drop is None else x * drop
    base = x @ w.T
    lora = (xd @ a.T) @ bb.T
    y = base + (0 if b is None else b)
    if m is None:
        return y + s * lora
    g = m / torch.linalg.norm(w + s * (bb @ a), dim=1).detach()
    return y + (g - 1) * (base if drop is None else xd @ w.T) + g * s * lora


def _formula_run(layer, x, gy, dtype, weight=None, drop=None):
    """[y, grad_x, grad_A, grad_B, (grad_m)] of `_formula` in `dtype` on the layer's tensors (rounded to dtype)."""
    w = (layer.base_weight() if weight is None else weight).detach().to(dtype)
    b = None if layer.bias is None else layer.bias.detach().to(dtype)
    tensors = [x, layer.lora_A.weight, layer.lora_B.weight] + ([layer.lora_magnitude_vector] if layer.use_dora else [])
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    m = leaves[3] if layer.use_dora else None
    y = _formula(leaves[0], w, b, leaves[1], leaves[2], layer.scaling, m, None if drop is None else drop.to(dtype))
    (y * gy.to(dtype)).sum().backward()
    return [y] + [t.grad for t in leaves]


def _run(layer, x, gy, seed=0):
    """[y, grad_x, grad_A, grad_B, (grad_m)] of the layer itself (dropout mask drawn after manual_seed(seed))."""
    xx = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(xx)
    (y * gy).sum().backward()
    grads = [xx.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    if layer.use_dora:
        grads.append(layer.lora_magnitude_vector.grad)
    return [y] + grads


def _mask(shape, p, seed):
    """The scaled dropout mask the layer draws: it applies dropout once, to x cast to fp32, after the seed."""
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape), p, training=True)


NAMES = ["y", "grad_x", "grad_A", "grad_B", "grad_m"]


# ---------------------------------------------------------------- init, scaling, repr, keys


def test_scaling_plain_and_rslora():
    assert _layer(64, 32, r=8, alpha=16).scaling == 2.0
    assert _layer(64, 32, r=8, alpha=16, rslora=True).scaling == pytest.approx(16 / math.sqrt(8), rel=1e-15)


def test_kaiming_init_bounds_and_zero_b():
    layer = LoRALinear(torch.randn(32, 4096), None, r=8, alpha=16)
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform(-b, b): std = b / sqrt(3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.requires_grad
    assert not layer.weight.requires_grad


def test_gaussian_init_std_is_one_over_r():
    layer = LoRALinear(torch.randn(32, 4096), None, r=8, alpha=16, init="gaussian")
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.05)  # peft: normal_(std=1/r)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_state_dict_keys_and_repr():
    model = nn.Sequential()
    model.add_module("proj", _layer(64, 32, dora=True))
    assert set(model.state_dict()) == {
        "proj.weight",
        "proj.bias",
        "proj.lora_A.weight",
        "proj.lora_B.weight",
        "proj.lora_magnitude_vector",
    }
    assert model.state_dict()["proj.lora_magnitude_vector"].shape == (32,)
    rep = repr(model.proj)
    for part in ("r=8", "alpha=16", "scaling=2", "dense(torch.float32)", "dora=True"):
        assert part in rep


# ---------------------------------------------------------------- forward / backward vs the formula


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("dora", [False, True])
def test_forward_and_grads_match_formula(dtype, in_f, out_f, dora):
    layer = _layer(in_f, out_f, dtype=dtype, dora=dora)
    x = torch.randn(3, 5, in_f).to(dtype)
    gy = torch.randn(3, 5, out_f).to(dtype)
    got = _run(layer, x, gy)
    assert got[0].dtype == dtype and layer.weight.grad is None and layer.bias.grad is None
    ref64, ref_d = _formula_run(layer, x, gy, torch.float64), _formula_run(layer, x, gy, dtype)
    for name, g, r, d in zip(NAMES, got, ref64, ref_d):
        _check(f"{'dora' if dora else 'lora'} {dtype} {in_f}x{out_f} {name}", g, r, d)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_applies_to_lora_input_only(dora):
    layer = _layer(64, 32, dropout=0.5, dora=dora).train()
    x, gy = torch.randn(4, 64), torch.randn(4, 32)
    got = _run(layer, x, gy, seed=123)
    drop = _mask(x.shape, 0.5, seed=123)
    assert 0 < torch.count_nonzero(drop) < drop.numel()
    ref64, ref32 = (_formula_run(layer, x, gy, d, drop=drop) for d in (torch.float64, torch.float32))
    for name, g, r, d in zip(NAMES, got, ref64, ref32):
        _check(f"dropout dora={dora} {name}", g, r, d)
    layer.eval()  # no dropout in eval mode
    got, ref64, ref32 = (
        _run(layer, x, gy),
        _formula_run(layer, x, gy, torch.float64),
        _formula_run(layer, x, gy, torch.float32),
    )
    _check(f"eval dora={dora} y", got[0], ref64[0], ref32[0])


# ---------------------------------------------------------------- DoRA init, merge


def test_dora_magnitude_init_is_row_norm():
    w = torch.randn(48, 64)
    layer = LoRALinear(w, None, r=4, alpha=8, dora=True)
    m = layer.lora_magnitude_vector
    assert m.shape == (48,) and m.requires_grad and m.dtype == torch.float32
    _check("dora m0", m, torch.linalg.norm(w.double(), dim=1), torch.linalg.norm(w, dim=1))


def test_dora_merge_equals_forward_and_unmerge_restores():
    layer = _layer(64, 48, dora=True).eval()
    x = torch.randn(5, 64)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    ref = _formula_run(layer, x, torch.ones(5, 48), torch.float64)[0]
    layer.merge()
    assert layer.merged
    _check("dora merged fwd", layer(x), ref, y)
    delta = layer.delta_weight()
    layer.unmerge()
    # W'' = fl(fl(f * fl(W + d)) / f) - d): a few fp32 roundings of |W + d|, one of |W|
    bound = 2 * torch.finfo(torch.float32).eps * ((w0 + delta).abs() + w0.abs())
    assert ((layer.weight - w0).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_w_plus_delta_rounded_once(dtype):
    layer = _layer(64, 48, dtype=dtype).eval()
    w0 = layer.weight.detach().clone()
    delta64 = layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    exact = w0.double() + delta64
    layer.merge()
    # fp32 error bounds: the r-term product B@A (gamma_r ~ r*u), the sum W + delta (u), then one rounding to dtype
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    prod = layer.scaling * (layer.lora_B.weight.double().abs() @ layer.lora_A.weight.double().abs())
    bound = eps / 2 * exact.abs() + eps32 * (w0.double().abs() + delta64.abs()) + layer.r * eps32 * prod
    assert ((layer.weight.double() - exact).abs() <= bound).all()
    x = torch.randn(3, 64).to(dtype)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # merged: the base path only
    layer.unmerge()
    assert not layer.merged
    if dtype == torch.float32:
        bound32 = eps32 * (w0.abs() + 2 * delta64.abs().float())
        assert ((layer.weight - w0).abs() <= bound32).all()


# ---------------------------------------------------------------- parity with peft


class _Tiny(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.proj = nn.Linear(64, 48, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _peft_pair(rslora=False, dora=False, dropout=0.0, bias=True):
    """peft's lora.Linear (via get_peft_model) and our LoRALinear with the same W, b, A, B (random), m."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Tiny(bias=bias)
    ours = LoRALinear.from_linear(
        nn.Linear(64, 48, bias=bias), r=8, alpha=16, dropout=dropout, rslora=rslora, dora=dora
    )
    with torch.no_grad():
        ours.weight.copy_(base.proj.weight)
        if bias:
            ours.bias.copy_(base.proj.bias)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["proj"], lora_dropout=dropout, use_rslora=rslora, use_dora=dora
    )
    pl = get_peft_model(base, cfg).base_model.model.proj
    with torch.no_grad():
        if dora:  # both computed at init from W (B = 0): they must agree before we perturb them
            assert torch.equal(_init_m(ours), pl.lora_magnitude_vector["default"].weight)
            pl.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(48))
            ours.lora_magnitude_vector.copy_(pl.lora_magnitude_vector["default"].weight)
        pl.lora_B["default"].weight.normal_(0, 0.1)
        ours.lora_A.weight.copy_(pl.lora_A["default"].weight)
        ours.lora_B.weight.copy_(pl.lora_B["default"].weight)
    return ours, pl


def _init_m(layer):
    fresh = LoRALinear(layer.weight.detach(), None, r=layer.r, alpha=layer.alpha, dora=True)
    return fresh.lora_magnitude_vector


def _peft_run(pl, x, gy, seed=0):
    xx = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = pl(xx)
    (y * gy).sum().backward()
    out = [y, xx.grad, pl.lora_A["default"].weight.grad, pl.lora_B["default"].weight.grad]
    if pl.use_dora["default"]:
        out.append(pl.lora_magnitude_vector["default"].weight.grad)
    return out


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora", "dora-nobias", "dropout", "dora-dropout"])
def test_matches_peft_fp32(variant):
    """Same output and gradients as peft's lora.Linear, fp32. Plain LoRA runs the same ops in the same order, so
    it must be bit-identical; peft's DoRA forms B@A as B(A(I)).T (another summation order), so there both are
    held to the fp64 formula with the 2x rule. With dropout both draw the mask once, after the same seed."""
    p = 0.3 if "dropout" in variant else 0.0
    ours, pl = _peft_pair(
        rslora=variant == "rslora", dora=variant.startswith("dora"), bias=variant != "dora-nobias", dropout=p
    )
    assert ours.scaling == pl.scaling["default"]
    x, gy = torch.randn(3, 5, 64), torch.randn(3, 5, 48)
    got, theirs = _run(ours, x, gy, seed=11), _peft_run(pl, x, gy, seed=11)
    drop = _mask(x.shape, p, seed=11) if p else None
    ref = _formula_run(ours, x, gy, torch.float64, drop=drop)
    for name, g, t, r in zip(NAMES, got, theirs, ref):
        print(f"peft {variant} {name}: max |ours - peft| = {_err(g, t):.3e}")
        if variant in ("plain", "rslora"):
            assert torch.equal(g, t), name
        else:
            _check(f"peft {variant} {name}", g, r, t)


# ---------------------------------------------------------------- NF4: nf4_linear, NF4Linear, QLoRA == LoRA


def _nf4(out_f, in_f, seed=0):
    from lorafuse.quant.nf4 import quantize_nf4

    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f))


class _SavedSizes:
    """Records the shapes autograd saves for backward during a forward pass."""

    def __init__(self):
        self.shapes = []

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def _pack(self, t):
        self.shapes.append(tuple(t.shape))
        return t

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_nf4_linear_matches_dense_and_saves_no_dense_weight(dtype, in_f, out_f):
    q = _nf4(out_f, in_f)
    w = q.dequantize(dtype)
    bias = torch.randn(out_f).to(dtype)
    x = torch.randn(2, 3, in_f).to(dtype).requires_grad_(True)
    with _SavedSizes() as saved:
        y = nf4_linear(x, q, bias)
    assert (out_f, in_f) not in saved.shapes and (in_f, out_f) not in saved.shapes
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = F.linear(x64, w.double(), bias.double())
    (gx64,) = torch.autograd.grad(y64, x64, gy.double())
    xd = x.detach().requires_grad_(True)
    yd = F.linear(xd, w, bias)
    (gxd,) = torch.autograd.grad(yd, xd, gy)
    _check(f"nf4_linear {dtype} y", y, y64, yd)
    _check(f"nf4_linear {dtype} grad_x", gx, gx64, gxd)


def _qlora_pair(dtype, in_f, out_f, **kw):
    """A QLoRA layer and a LoRA layer whose dense weight is the NF4 weight dequantized to `dtype`; same b, A, B, m."""
    q = _nf4(out_f, in_f, seed=1)
    bias = torch.randn(out_f).to(dtype)
    ql = LoRALinear(q, bias, r=8, alpha=16, compute_dtype=dtype, **kw)
    dl = LoRALinear(q.dequantize(dtype), bias.clone(), r=8, alpha=16, **kw)
    with torch.no_grad():
        ql.lora_B.weight.normal_(0, 0.1)
        dl.lora_A.weight.copy_(ql.lora_A.weight)
        dl.lora_B.weight.copy_(ql.lora_B.weight)
        if ql.use_dora:  # magnitude init from the dequantized weight: identical before we perturb it
            assert torch.equal(ql.lora_magnitude_vector, dl.lora_magnitude_vector)
            ql.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(out_f))
            dl.lora_magnitude_vector.copy_(ql.lora_magnitude_vector)
    return ql, dl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "dora", "dropout", "dora-dropout"])
def test_qlora_equals_lora_on_dequantized_weight(dtype, in_f, out_f, variant):
    p = 0.2 if "dropout" in variant else 0.0
    ql, dl = _qlora_pair(dtype, in_f, out_f, dora=variant.startswith("dora"), dropout=p)
    x, gy = torch.randn(2, 5, in_f).to(dtype), torch.randn(2, 5, out_f).to(dtype)
    with _SavedSizes() as saved:
        torch.manual_seed(3)
        ql(x.clone().requires_grad_(True))
    assert (out_f, in_f) not in saved.shapes, "the QLoRA layer kept a dense weight for backward"
    got, dense = _run(ql, x, gy, seed=3), _run(dl, x, gy, seed=3)
    drop = _mask(x.shape, p, seed=3) if p else None
    ref = _formula_run(dl, x, gy, torch.float64, drop=drop)
    for name, g, d, r in zip(NAMES, got, dense, ref):
        _check(f"qlora {variant} {dtype} {in_f}x{out_f} {name}", g, r, d)


def test_nf4linear_forward_apply_and_state_dict():
    from lorafuse.quant.nf4 import NF4Weight

    lin = nn.Linear(64, 40)
    layer = NF4Linear.from_linear(lin)
    assert isinstance(layer.weight, NF4Weight) and not list(layer.parameters())[0].requires_grad
    x = torch.randn(3, 64)
    w = layer.weight.dequantize(torch.float32)
    _check("NF4Linear fwd", layer(x), F.linear(x.double(), w.double(), lin.bias.double()), F.linear(x, w, lin.bias))
    packed = layer.weight.packed.clone()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.weight.packed.dtype == torch.uint8 and torch.equal(layer.weight.packed, packed)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.half()
    assert layer.compute_dtype == torch.float16 and torch.equal(layer.weight.packed, packed)
    sd = layer.state_dict()
    assert set(sd) == {"bias", *BNB_KEYS}
    fresh = NF4Linear.from_linear(nn.Linear(64, 40)).half()
    fresh.load_state_dict(sd)  # strict: no missing or unexpected keys
    assert torch.equal(fresh.weight.packed, packed) and torch.equal(fresh.bias, layer.bias)
    assert torch.equal(fresh(x.half()), layer(x.half()))


def test_nf4linear_loads_a_dense_weight_by_quantizing():
    from lorafuse.quant.nf4 import quantize_nf4

    lin = nn.Linear(64, 40)
    layer = NF4Linear.from_linear(nn.Linear(64, 40))
    layer.load_state_dict({"weight": lin.weight.detach(), "bias": lin.bias.detach()})
    assert torch.equal(layer.weight.packed, quantize_nf4(lin.weight.detach()).packed)
    with pytest.raises(RuntimeError, match="shape"):
        layer.load_state_dict({"weight": torch.randn(40, 32), "bias": lin.bias.detach()})


def test_lora_nf4_state_dict_apply_and_merge_raises():
    ql, _ = _qlora_pair(torch.bfloat16, 64, 48, dora=True)
    sd = ql.state_dict()
    assert set(sd) == {*BNB_KEYS, "bias", "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert "nf4" in repr(ql) and "r=8" in repr(ql)
    fresh = LoRALinear(
        _nf4(48, 64, seed=9), torch.zeros(48).bfloat16(), r=8, alpha=16, dora=True, compute_dtype=torch.bfloat16
    )
    fresh.load_state_dict(sd)  # strict
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(fresh(x), ql(x)) and torch.equal(fresh.weight.packed, ql.weight.packed)
    packed = ql.weight.packed.clone()
    ql.half()  # a float cast: compute dtype and bias follow; the packed codes do not
    assert ql.compute_dtype == torch.float16 and ql.bias.dtype == torch.float16
    assert torch.equal(ql.weight.packed, packed) and ql(x.half()).dtype == torch.float16
    with pytest.raises(LorafuseError, match="lorafuse.merge"):
        ql.merge()


@pytest.mark.gpu
def test_cuda_moves_nf4_and_matches_formula():
    ql, _ = _qlora_pair(torch.bfloat16, 64, 48)
    x, gy = torch.randn(2, 64).bfloat16(), torch.randn(2, 48).bfloat16()
    cpu = _run(ql, x, gy)
    ref = _formula_run(ql, x, gy, torch.float64)
    ql.zero_grad(set_to_none=True)
    ql.cuda()
    assert ql.weight.device.type == "cuda" and ql.lora_A.weight.device.type == "cuda"
    assert ql.weight.packed.dtype == torch.uint8 and ql.compute_dtype == torch.bfloat16
    gpu = _run(ql, x.cuda(), gy.cuda())
    for name, g, c, r in zip(NAMES, gpu, cpu, ref):
        _check(f"cuda {name}", g.cpu(), r, c)

"""The grouped LoRA linear (q|k|v as one base GEMM) equals its projections' separate lora_linear calls:
output and every gradient, NF4 and dense bases, GQA-like unequal widths, dropout with per-projection seeds."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from lorafuse.kernels import lora_group as lg
from lorafuse.kernels import lora_linear as ll
from lorafuse.kernels.reference import DropoutSeed, LoRAWeights, lora_linear_reference
from lorafuse.quant.nf4 import quantize_nf4

TOKENS, K = (2, 11), 64  # x (B, T, K): M = 22 tokens, not a multiple of any tile
WIDTHS, RANKS = (64, 32, 32), (4, 8, 4)  # GQA-like: q wider than k and v; ranks differ per projection


@pytest.fixture(autouse=True)
def _group_on(monkeypatch):
    """The group is off by default (LORAFUSE_QKV_GROUP=1 turns it on); these tests are about the group."""
    monkeypatch.setattr(lg, "GROUP", True)


def _specs(base, dropout, bias, device, seeds="int", widths=WIDTHS, ranks=RANKS, tokens=TOKENS, k=K):
    """x (B, T, K), random q, k, v LoRAWeights (fp32; each its own scaling, dropout rate and seed) and upstream
    gradients. bias: "grad" (a trainable bias on every projection), "mixed" (frozen, k without one) or None.
    seeds: "int" (the caller's), "drawn" (None: lora_linear draws them) or "device" (the fast path's)."""
    g = torch.Generator().manual_seed(0)
    base_seed = torch.tensor(5, dtype=torch.int64, device=device)
    seed_of = {"int": lambda i: 1000 + 7 * i, "drawn": lambda i: None, "device": lambda i: DropoutSeed(base_seed, i)}
    specs = []
    for i, (n, r) in enumerate(zip(widths, ranks)):
        w = torch.randn(n, k, generator=g) / k**0.5
        b = (torch.randn(n, generator=g) * 0.1).to(device).requires_grad_(bias == "grad")
        specs.append(
            LoRAWeights(
                weight=quantize_nf4(w.to(device)) if base == "nf4" else w.to(device),
                bias=None if bias is None or (bias == "mixed" and i == 1) else b,
                lora_A=(torch.randn(r, k, generator=g) / k**0.5).to(device).requires_grad_(),
                lora_B=(torch.randn(n, r, generator=g) / r**0.5).to(device).requires_grad_(),  # a trained-looking B
                scaling=1.0 + i,
                dropout_p=dropout * (1 + i) / 2,
                seed=seed_of[seeds](i) if dropout else None,
            )
        )
    x = torch.randn(*tokens, k, generator=g).to(device)
    dys = [torch.randn(*tokens, n, generator=g).to(device) for n in widths]
    return x, specs, dys


def _fresh(specs, dtype):
    """Leaf copies with the base and bias in the compute dtype (LoRA masters keep theirs, as in training)."""
    out = []
    for lw in specs:
        w = lw.weight if lw.is_nf4 else lw.weight.to(dtype)
        b = None if lw.bias is None else lw.bias.detach().to(dtype).requires_grad_(lw.bias.requires_grad)
        out.append(
            dataclasses.replace(
                lw,
                weight=w,
                bias=b,
                lora_A=lw.lora_A.detach().clone().requires_grad_(),
                lora_B=lw.lora_B.detach().clone().requires_grad_(),
            )
        )
    return out


def _run(fn, x, specs, dys, dtype):
    """Outputs and every gradient of fn(x, specs) -> tuple, by name; torch's generator reset first, so seeds
    that lora_linear draws are the same draws for every fn."""
    torch.manual_seed(123)
    x = x.detach().to(dtype).requires_grad_()
    specs = _fresh(specs, dtype)
    ys = fn(x, specs)
    torch.autograd.backward(ys, [dy.to(dtype) for dy in dys])
    res = {f"y{i}": y.detach() for i, y in enumerate(ys)}
    res["dx"] = x.grad
    for i, lw in enumerate(specs):
        res[f"dA{i}"], res[f"dB{i}"] = lw.lora_A.grad, lw.lora_B.grad
        if lw.bias is not None and lw.bias.requires_grad:
            res[f"db{i}"] = lw.bias.grad
    return res, ys


def _singles(x, specs):
    return tuple(ll.lora_linear(x, lw) for lw in specs)


def _references(x, specs):
    return tuple(lora_linear_reference(x, ll.with_seed(lw)) for lw in specs)  # as REFERENCE_OPS.linear_group


def _group_node(y):
    """The LoRAGroupFunction backward node under the (..., N) view, or None (the group fell back)."""
    fn = y.grad_fn.next_functions[0][0]
    return fn if type(fn).__name__ == "LoRAGroupFunctionBackward" else None


def _assert_same(got, want, dtype):
    """Equal up to the dtype's rounding: the group only reorders roundings (one GEMM instead of three, dx
    accumulated in place instead of autograd's sum of three); a misplaced slice, a lost LoRA term, another
    mask or a wrong dx sum moves elements by O(1) relative to the tensor's scale."""
    assert set(got) == set(want), (set(got), set(want))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol * scale, msg=name)


CASES = [  # (base, dtype, dropout, seeds, bias, dX as one GEMM over the concatenated dY)
    ("nf4", torch.float32, 0.0, "int", "grad", False),
    ("nf4", torch.float16, 0.2, "drawn", "mixed", False),
    ("nf4", torch.float32, 0.2, "int", None, True),
    ("nf4", torch.float16, 0.0, "int", "grad", True),
    ("dense", torch.float32, 0.2, "device", "grad", False),
    ("dense", torch.float16, 0.0, "int", "mixed", False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-p{c[2]}-{c[3]}-{c[4]}-cat{int(c[5])}")
def test_group_equals_three_single_calls(case, device, monkeypatch):
    base, dtype, dropout, seeds, bias, dx_cat = case
    monkeypatch.setattr(ll, "NF4_FUSED_MAX_M", 0)
    monkeypatch.setattr(ll, "DENSE_FUSED_MAX_M", 0)
    monkeypatch.setattr(lg, "GROUP_DX_CAT", dx_cat)
    x, specs, dys = _specs(base, dropout, bias, device, seeds)
    got, ys = _run(lg.lora_linear_group, x, specs, dys, dtype)
    want, _ = _run(_singles, x, specs, dys, dtype)
    assert all(_group_node(y) is not None for y in ys), "the group must not have fallen back"
    whole = ys[0]._base  # one (M, sum N) tensor, the outputs its column slices in order
    assert whole is not None and tuple(whole.shape) == (TOKENS[0] * TOKENS[1], sum(WIDTHS))
    starts = [(y.data_ptr() - whole.data_ptr()) // whole.element_size() for y in ys]
    assert starts == [0, WIDTHS[0], WIDTHS[0] + WIDTHS[1]]
    _assert_same(got, want, dtype)


def test_group_saves_only_x_and_s_and_dequantizes_once(device, monkeypatch):
    """The memory claims: backward keeps x, the (M, r_i) S tensors and the small casts of A_i and s_i B_i (each
    (r_i, K) and (N_i, r_i)), nothing (M, N) or (N, K) in size; the forward and the backward each
    dequantize every weight once, into its row slice of one buffer grown to the group, which a single
    projection then reuses."""
    monkeypatch.setattr(ll, "NF4_FUSED_MAX_M", 0)
    monkeypatch.setattr(ll, "_BUFFERS", {})
    x, specs, dys = _specs("nf4", 0.2, None, device)
    calls = []
    dequantize = lg.nf4_dequantize
    monkeypatch.setattr(
        lg, "nf4_dequantize", lambda w, dtype, out: calls.append(out.data_ptr()) or dequantize(w, dtype, out=out)
    )
    x = x.requires_grad_()
    ys = lg.lora_linear_group(x, specs)
    node = _group_node(ys[0])
    m = TOKENS[0] * TOKENS[1]
    casts = [shape for r, n in zip(RANKS, WIDTHS) for shape in ((r, K), (n, r))]
    assert [tuple(t.shape) for t in node.saved_tensors] == [(m, K)] + [(m, r) for r in RANKS] + casts
    assert node.saved_tensors[0].data_ptr() == x.data_ptr()
    buf = ll._BUFFERS[x.device]
    assert buf.numel() == sum(WIDTHS) * K * 4  # bytes of fp32
    rows = [buf.data_ptr() + r * K * 4 for r in (0, WIDTHS[0], WIDTHS[0] + WIDTHS[1])]
    assert calls == rows, "each weight into its row slice of the buffer"
    torch.autograd.backward(ys, dys)
    assert calls == rows + rows, "backward dequantizes the group once, into the same slices"
    ll.lora_linear(x, specs[0])
    assert ll._BUFFERS[x.device] is buf, "a single weight reuses the group's buffer"


@pytest.mark.parametrize("why", ["mixed kinds", "fused dispatch", "cpu reference", "trainable base", "switched off"])
def test_fallback_runs_the_single_path(why, device, monkeypatch):
    """Where the group does not apply it runs one lora_linear per projection (seeds drawn in the same order)."""
    from lorafuse.kernels import _runtime

    if why == "cpu reference" and device.type == "cuda":
        pytest.skip("the reference path is the CPU's")
    monkeypatch.setattr(ll, "NF4_FUSED_MAX_M", 10**9 if why == "fused dispatch" else 0)
    monkeypatch.setattr(ll, "DENSE_FUSED_MAX_M", 0)
    monkeypatch.setattr(lg, "GROUP", why != "switched off")  # LORAFUSE_QKV_GROUP=0
    x, specs, dys = _specs("nf4", 0.2, "grad", device, seeds="drawn")
    if why == "mixed kinds":
        specs[1] = dataclasses.replace(specs[1], weight=specs[1].weight.dequantize(torch.float32))
    if why == "trainable base":
        specs = [dataclasses.replace(lw, weight=lw.weight.dequantize(torch.float32).requires_grad_()) for lw in specs]
    with _runtime.cpu_kernels(False) if why == "cpu reference" else contextlib.nullcontext():
        got, ys = _run(lg.lora_linear_group, x, specs, dys, torch.float32)
        want, _ = _run(_singles, x, specs, dys, torch.float32)
    assert all(_group_node(y) is None for y in ys)
    assert all(y._base is None or y._base.shape[-1] == y.shape[-1] for y in ys), "no grouped output"
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if why in ("cpu reference", "trainable base"):
        ref, _ = _run(_references, x, specs, dys, torch.float32)
        assert all(torch.equal(got[name], ref[name]) for name in ref)


def test_checkpoint_recompute_regenerates_the_masks(device, monkeypatch):
    """Under non-reentrant checkpointing the forward runs twice; device seeds (the fast path's) give the
    recompute the forward's masks, so the gradients equal those of a plain run."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(ll, "NF4_FUSED_MAX_M", 0)
    x, specs, dys = _specs("nf4", 0.2, None, device, seeds="device")
    forwards = []
    group_forward = lg.group_forward
    monkeypatch.setattr(lg, "group_forward", lambda *a: forwards.append(1) or group_forward(*a))
    plain, _ = _run(lg.lora_linear_group, x, specs, dys, torch.float32)
    ckpt, _ = _run(
        lambda x, sp: checkpoint(lg.lora_linear_group, x, sp, use_reentrant=False), x, specs, dys, torch.float32
    )
    assert len(forwards) == 3, "plain forward, checkpointed forward, recompute"
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("widths", [(4096, 4096, 4096), (4096, 1024, 1024)], ids=["llama2-7b", "llama3-8b-gqa"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dx_cat", [False, True])
def test_group_equals_single_calls_gpu(widths, dropout, dx_cat, monkeypatch, parity):
    """bf16 NF4 at M = 2048 (4 x 512 tokens), K = 4096, r = 16. The grouped GEMM is another cuBLAS kernel than
    three single ones and dx sums in another order, so the two need not be bit-equal; both are held to DESIGN
    rule 2 against an fp64 oracle: the group's error at most 2x the error of the three single calls."""
    monkeypatch.setattr(ll, "NF4_FUSED_MAX_M", 0)
    monkeypatch.setattr(lg, "GROUP_DX_CAT", dx_cat)
    device = torch.device("cuda")
    x, specs, dys = _specs("nf4", dropout, "grad", device, widths=widths, ranks=(16, 16, 16), tokens=(4, 512), k=4096)
    got, ys = _run(lg.lora_linear_group, x, specs, dys, torch.bfloat16)
    ref, _ = _run(_singles, x, specs, dys, torch.bfloat16)
    assert all(_group_node(y) is not None for y in ys)
    oracle_specs = [
        dataclasses.replace(
            lw,
            weight=lw.weight.dequantize(torch.float32).double(),
            lora_A=lw.lora_A.detach().double(),
            lora_B=lw.lora_B.detach().double(),
        )
        for lw in specs
    ]
    oracle, _ = _run(_references, x, oracle_specs, dys, torch.float64)
    for name in oracle:
        parity(f"group/{widths}/p={dropout}/cat={dx_cat}/{name}", got[name], ref[name], oracle[name])

"""Chunked cross-entropy fused with the head: loss, d(hidden), d(head), d(bias) vs an fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from lorafuse.kernels.cross_entropy import fused_linear_cross_entropy
from lorafuse.kernels.reference import fused_linear_cross_entropy_reference


def _run(fn, hidden, weight, bias, labels, dtype, reduction, chunk):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    loss = fn(h, w, labels, bias=b, reduction=reduction, chunk_size=chunk)
    (loss * 1.5).backward()  # a non-unit upstream gradient: backward must scale
    out = {"loss": loss.detach().reshape(1), "dh": h.grad, "dw": w.grad}
    if b is not None:
        out["db"] = b.grad
    return out


def _check(t, hdim, vocab, dtype, reduction, with_bias, chunk, device, parity):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, hdim, generator=g).to(device)
    weight = (torch.randn(vocab, hdim, generator=g) / hdim**0.5 * 4).to(device)  # peaked softmax
    bias = (torch.randn(vocab, generator=g) * 0.5).to(device) if with_bias else None
    labels = torch.randint(0, vocab, (t,), generator=g)
    labels[torch.rand(t, generator=g) < 0.3] = -100  # prompt rows: not trained
    labels = labels.to(device)
    oracle = _run(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, torch.float64, reduction, chunk)
    ref = _run(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, dtype, reduction, chunk)
    got = _run(fused_linear_cross_entropy, hidden, weight, bias, labels, dtype, reduction, chunk)
    assert set(got) == set(oracle)
    for name in oracle:
        parity(f"ce/{dtype}/{reduction}/{name}", got[name], ref[name], oracle[name])
    dh = got["dh"]
    assert torch.all(dh[labels == -100] == 0), "ignored rows get no gradient"


@pytest.mark.parametrize(
    "t,hdim,vocab,dtype,reduction,with_bias,chunk",
    [
        (13, 32, 100, torch.float32, "mean", False, 5),  # 3 chunks, last partial; vocab not a power of two
        (9, 16, 300, torch.float16, "sum", True, None),  # one chunk; several vocab blocks; bias
    ],
)
def test_fused_linear_ce_parity(t, hdim, vocab, dtype, reduction, with_bias, chunk, device, parity):
    _check(t, hdim, vocab, dtype, reduction, with_bias, chunk, device, parity)


def test_frozen_head_gets_no_gradient_and_logits_stay_chunked(device):
    hidden = torch.randn(12, 16, device=device, requires_grad=True)
    head = torch.randn(50, 16, device=device)  # frozen (requires_grad False)
    labels = torch.randint(0, 50, (12,), device=device)
    loss = fused_linear_cross_entropy(hidden, head, labels, chunk_size=4)
    saved = loss.grad_fn.saved_tensors
    assert all(t is None or t.shape == hidden.shape for t in saved), "nothing vocabulary-sized is saved"
    loss.backward()
    assert hidden.grad is not None and head.grad is None


@pytest.mark.gpu
@pytest.mark.parametrize("t,vocab", [(4096, 128256), (2048, 32000), (1000, 151936)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_ce_parity_gpu(t, vocab, dtype, parity):
    _check(t, 4096, vocab, dtype, "mean", False, None, torch.device("cuda"), parity)


@pytest.mark.parametrize(
    "t,hdim,vocab,dtype,with_bias,chunk",
    [
        (13, 32, 100, torch.float32, False, 5),  # 3 contiguous chunks, the last partial; 30% of rows ignored
        (9, 16, 300, torch.float16, True, None),
    ],
)
def test_fixed_shape_pass_matches_the_oracle(t, hdim, vocab, dtype, with_bias, chunk, device, parity, monkeypatch):
    """The pass CUDA-graph capture takes (every row, ignored rows weighted 0, no nonzero()) gives the same
    loss and gradients as the row-selecting pass, within the same-dtype reference's error."""
    from lorafuse.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "FIXED_SHAPE", True)
    _check(t, hdim, vocab, dtype, "sum", with_bias, chunk, device, parity)


def _rows_check(t, hdim, vocab, dtype, device, parity):
    """Trainable token rows (ids I, values R, lora/token_rows.py): the logit columns I are h R^T; the loss,
    d hidden and d R match the reference that builds every logit with W's rows I replaced (the frozen W gets none)."""
    from lorafuse.lora.token_rows import Rows

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(t, hdim, generator=g).to(device)
    weight = (torch.randn(vocab, hdim, generator=g) / hdim**0.5 * 4).to(device)
    index = torch.tensor([3, 17, 64], device=device)
    values = (torch.randn(3, hdim, generator=g) / hdim**0.5 * 4).to(device)
    labels = torch.randint(0, vocab, (t,), generator=g)
    n = max(3, t // 4)  # a quarter of the targets are the replaced tokens, so the rows change the loss at any size
    labels[:n] = torch.tensor([3, 17, 64]).repeat(n // 3 + 1)[:n]
    labels[n + 1] = -100
    labels = labels.to(device)

    def run(fn, dtype):
        h, r = (t.detach().to(dtype).clone().requires_grad_() for t in (hidden, values))
        loss = fn(h, weight.to(dtype), labels, reduction="sum", chunk_size=5, rows=Rows(index, r))
        (loss * 1.5).backward()
        return {"loss": loss.detach().reshape(1), "dh": h.grad, "dr": r.grad}

    oracle = run(fused_linear_cross_entropy_reference, torch.float64)
    ref = run(fused_linear_cross_entropy_reference, dtype)
    got = run(fused_linear_cross_entropy, dtype)
    for name in oracle:
        parity(f"ce-rows/{dtype}/{name}", got[name], ref[name], oracle[name])
    plain = fused_linear_cross_entropy_reference(hidden.double(), weight.double(), labels, reduction="sum")
    assert (plain - oracle["loss"]).abs() > 0.1, "the rows must change the loss"


@pytest.mark.parametrize("fixed", [False, True], ids=["selected-rows", "fixed-shape"])
def test_token_rows_replace_head_rows(fixed, device, parity, monkeypatch):
    from lorafuse.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "FIXED_SHAPE", fixed)
    _rows_check(13, 32, 100, torch.float32, device, parity)


@pytest.mark.gpu
@pytest.mark.parametrize("fixed", [False, True], ids=["selected-rows", "fixed-shape"])
def test_token_rows_replace_head_rows_gpu(fixed, parity, monkeypatch):
    from lorafuse.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "FIXED_SHAPE", fixed)
    _rows_check(2048, 4096, 32000, torch.bfloat16, torch.device("cuda"), parity)

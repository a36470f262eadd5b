"""The summed, chunked LM loss against plain cross-entropy and the model's own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy import ToyBatches, toy_model

from lorafuse.accel.host_tables import simple_head
from lorafuse.training.loss import chunked_lm_loss, count_targets, lm_loss_sum


def _problem(n=37, d=24, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def _reference(h, w, labels):
    return F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_chunked_loss_and_grads_match_cross_entropy(chunk):
    hidden, weight, labels = _problem()
    exact = _value_and_grads(_reference, hidden, weight, labels)  # fp64
    ref32 = _value_and_grads(_reference, hidden.float(), weight.float(), labels)
    ours = _value_and_grads(
        lambda h, w, y: chunked_lm_loss(h, w, y, chunk=chunk), hidden.float(), weight.float(), labels
    )
    for o, r, e in zip(ours, ref32, exact):
        # No worse than 2x the error of PyTorch's own fp32 cross-entropy against the fp64 truth.
        assert (o - e).abs().max() <= 2 * (r - e).abs().max() + 1e-12


def _rows_reference(h, w, labels, index, values):
    """Every logit, with W's rows `index` replaced by `values` (what trainable token rows mean)."""
    logits = (h @ w.t()).index_copy(1, index, h @ values.t())
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [4, None])
def test_token_rows_replace_head_rows_and_get_their_gradient(chunk):
    from lorafuse.lora.token_rows import Rows

    hidden, weight, labels = _problem(seed=2)
    index = torch.tensor([3, 17, 40])
    labels[:6] = index.repeat(2)  # some targets are the replaced tokens themselves
    values = torch.randn(3, hidden.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(fn, dtype):
        h, r = (t.detach().to(dtype).clone().requires_grad_() for t in (hidden, values))
        loss = fn(h, weight.to(dtype), labels, r)
        (1.5 * loss).backward()  # a non-unit upstream gradient: backward must scale
        return loss.detach().double(), h.grad.double(), r.grad.double()

    exact = run(lambda h, w, y, r: _rows_reference(h, w, y, index, r), torch.float64)
    ref32 = run(lambda h, w, y, r: _rows_reference(h, w, y, index, r), torch.float32)
    ours = run(lambda h, w, y, r: chunked_lm_loss(h, w, y, chunk=chunk, rows=Rows(index, r)), torch.float32)
    for name, o, r, e in zip(("loss", "d hidden", "d rows"), ours, ref32, exact):
        # relative (Frobenius) error: no worse than 2x that of PyTorch's fp32 autograd through every logit, with
        # the fp32 floor of the kernel tests (tests/kernels/conftest.py) for a reference that happens to be exact
        err, ref_err = float((o - e).norm() / e.norm()), float((r - e).norm() / e.norm())
        assert err <= 2 * max(ref_err, 1e-6), f"{name}: {err:.3g} vs the fp32 reference's {ref_err:.3g}"
    plain = _reference(hidden, weight, labels)
    assert (exact[0] - plain).abs() > 1e3 * (ref32[0] - exact[0]).abs(), "the rows must change the loss"


def test_no_grad_path_returns_the_same_value():
    hidden, weight, labels = _problem(seed=1)
    with torch.no_grad():
        value = chunked_lm_loss(hidden.float(), weight.float(), labels, chunk=4)
    assert value.dtype == torch.float32
    assert torch.allclose(value.double(), _reference(hidden, weight, labels), rtol=1e-5)


def test_lm_loss_sum_equals_the_models_mean_loss_times_targets():
    model = toy_model(dropout=0.0)
    batch = next(ToyBatches(micro_batch_size=3).epoch_batches(0))
    head = simple_head(model)
    assert head is model.lm_head
    with torch.no_grad():
        ours = lm_loss_sum(model, batch, head)
        hf = model(**batch).loss * count_targets(batch)  # HF: mean over shifted targets
        fallback = lm_loss_sum(model, batch, head=None)
        exact = model.double()(**batch).loss.double() * count_targets(batch)
    assert (ours.double() - exact).abs() <= 2 * (hf.double() - exact).abs() + 1e-9 * exact
    assert (fallback.double() - exact).abs() <= 2 * (hf.double() - exact).abs() + 1e-9 * exact


def test_backward_keeps_nothing_vocabulary_sized():
    vocab = 512
    model = toy_model(dropout=0.0, vocab_size=vocab)
    batch = next(ToyBatches(micro_batch_size=4, seq_len=16, vocab_size=vocab).epoch_batches(0))
    b, t = batch["input_ids"].shape
    for head in (simple_head(model), None):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
            loss = lm_loss_sum(model, batch, head)
        vocab_sized = [s for s in saved if s and s[-1] == vocab and torch.Size(s).numel() >= b * t * vocab / 2]
        if head is None:
            assert vocab_sized, "the fallback path keeps the logits: the check must be able to see them"
        else:
            assert not vocab_sized
        loss.backward()

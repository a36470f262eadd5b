"""Per-sequence log-probs through the head in chunks: values and gradients (hidden and a trainable head)."""

from __future__ import annotations

import pytest
import torch

from lorafuse.accel import simple_head
from lorafuse.kernels.cross_entropy import fixed_shape
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.training.objectives.logps import chunked_sequence_logps, response_tokens, sequence_logps


def _problem(rows=5, width=11, dim=24, vocab=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (rows, width), generator=g)
    labels[torch.rand(rows, width, generator=g) < 0.4] = -100
    return hidden, weight, labels


def _reference(h, w, labels):
    picked = (h @ w.t()).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (labels != -100)).sum(1)


def _value_and_grads(fn, hidden, weight, labels, upstream):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(h, w, labels)
    (out * upstream).sum().backward()  # a different weight per sequence, as DPO's backward sends
    return out.detach().double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("fixed", [False, True], ids=["trained-tokens", "fixed-shape"])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_sequence_logps_and_grads_match_log_softmax(chunk, fixed):
    """Both passes: over the trained tokens only, and the fixed-shape one a CUDA graph records (every token
    through the head, the untrained ones weighted 0)."""
    hidden, weight, labels = _problem()
    upstream = torch.linspace(-2, 3, hidden.shape[0], dtype=torch.float64)
    exact = _value_and_grads(_reference, hidden, weight, labels, upstream)  # fp64
    ref32 = _value_and_grads(_reference, hidden.float(), weight.float(), labels, upstream.float())
    with fixed_shape(fixed):
        ours = _value_and_grads(
            lambda h, w, y: chunked_sequence_logps(h, w, y, chunk=chunk),
            hidden.float(),
            weight.float(),
            labels,
            upstream.float(),
        )
    for name, o, r, e in zip(("logps", "d hidden", "d weight"), ours, ref32, exact):
        # no worse than 2x the error of PyTorch's own fp32 log_softmax against the fp64 truth
        assert (o - e).abs().max() <= 2 * (r - e).abs().max() + 1e-12, name


def test_sequence_logps_equals_the_models_logits_and_counts_tokens(tiny_tokenizer):
    model = apply_lora(build_tiny_model(tokenizer=tiny_tokenizer), r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100
    inputs = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        chunked = sequence_logps(model, inputs, simple_head(model))
        full = sequence_logps(model, inputs, None)  # the model's own logits
        logits = model(input_ids=ids).logits
    by_hand = torch.stack(
        [
            sum(logits[r, t].log_softmax(-1)[ids[r, t + 1]] for t in range(9) if labels[r, t + 1] != -100)
            for r in range(3)
        ]
    )
    assert torch.allclose(chunked, by_hand, rtol=0, atol=8 * torch.finfo(torch.float32).eps * by_hand.abs().max())
    assert torch.allclose(full, by_hand, rtol=0, atol=8 * torch.finfo(torch.float32).eps * by_hand.abs().max())
    assert response_tokens(labels).tolist() == [6, 6, 4]

"""train.shared_prompt: DPO and ORPO with each pair's prompt run once give the losses, metrics and gradients of a
row per answer (the model's own attention with the 4-D mask, and the fast path's two causal attentions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.accel import fast_path, simple_head
from lorafuse.accel.fast_path import apply_fast_path
from lorafuse.config import DataConfig, TrainConfig
from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.errors import ConfigError
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.training.objectives import ObjectiveContext, build_objective
from lorafuse.training.objectives.dpo import DPOObjective, shares_prompt
from lorafuse.training.objectives.logps import chunked_sequence_logps, response_tokens, sequence_tokens
from lorafuse.training.objectives.orpo import ORPOObjective
from lorafuse.training.runtime import Precision

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISION = Precision(torch.device("cpu"), torch.float32)
# fp32 sums over a few hundred tokens and a 512-word vocabulary differ by ~1e-6 relative between the two layouts
# (other matmul shapes, other summation orders); a token attending to the wrong keys moves them by ~1e-2
RTOL = 1e-4


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    data = DataConfig(path="builtin:preference", format="preference", prompt_format="alpaca", max_length=128)
    pairs = build_datasets(data, tiny_tokenizer)[0].subset(np.arange(8))
    return next(Batcher(pairs, 4, tiny_tokenizer.pad_token_id, pairs=True, shuffle=False).epoch_batches(0))


def _model(tok, fast: bool):
    torch.manual_seed(0)
    model = apply_lora(build_tiny_model(tokenizer=tok), r=8, alpha=16, dropout=0.0, targets=TARGETS)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():  # a moved adapter: the policy differs from the reference, gradients are not zero
        if p.requires_grad:
            p.data += 0.05 * torch.randn(p.shape, generator=g)
    if fast:
        state, reason = apply_fast_path(model, use_reference=True)
        assert state is not None, reason
    return model


def _loss_and_grads(objective, model, batch, head):
    ctx = ObjectiveContext(PRECISION, simple_head(model) if head else None)
    model.zero_grad(set_to_none=True)
    loss, metrics = objective.loss_sum(model, batch, ctx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def _close(a, b):
    return torch.allclose(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


@pytest.mark.parametrize("fast", [False, True], ids=["model-attention", "fast-path"])
@pytest.mark.parametrize("head", [True, False], ids=["chunked-head", "model-logits"])
@pytest.mark.parametrize("kind", ["dpo", "ipo", "orpo"])
def test_shared_prompt_equals_a_row_per_answer(tiny_tokenizer, batch, kind, head, fast, monkeypatch):
    def make(shared):
        if kind == "orpo":
            return ORPOObjective(0.1, shared_prompt=shared)
        return DPOObjective(loss="sigmoid" if kind == "dpo" else "ipo", shared_prompt=shared)

    calls = []
    plan = fast_path._pair_attention
    monkeypatch.setattr(fast_path, "_pair_attention", lambda *a: calls.append(1) or plan(*a))
    model = _model(tiny_tokenizer, fast)
    loss_sep, metrics_sep, grads_sep = _loss_and_grads(make("off"), model, batch, head)
    assert not calls
    loss_sh, metrics_sh, grads_sh = _loss_and_grads(make("on"), model, batch, head)
    assert bool(calls) == fast  # the fast path's attention took the two-attention plan; the model's the mask
    assert _close(loss_sh, loss_sep)
    for name in metrics_sep:
        assert _close(metrics_sh[name], metrics_sep[name]), name
    assert grads_sep and all(g.abs().max() > 0 for g in grads_sep.values())
    for name, grad in grads_sep.items():
        assert _close(grads_sh[name], grad), name


def test_response_token_counts_match(tiny_tokenizer, batch):
    model = _model(tiny_tokenizer, fast=False)
    objective = DPOObjective(shared_prompt="on")
    shared = objective.inputs(model, batch, PRECISION)
    assert shared["input_ids"].shape[0] == batch["num_pairs"]
    assert torch.equal(sequence_tokens(shared), response_tokens(batch["labels"]))


@pytest.mark.parametrize("chunk", [3, None])
def test_extra_predictions_and_a_trainable_head(chunk):
    """Predictions scored besides the shifted labels (the first rejected tokens: a position that already scores one
    label scores another for another response): values and gradients, hidden and head, against log_softmax."""
    g = torch.Generator().manual_seed(0)
    rows, width, dim, vocab = 3, 7, 16, 41
    hidden = torch.randn(rows, width, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (rows, width), generator=g)
    labels[:, :2] = -100
    row_of = torch.randint(0, 5, (rows * width,), generator=g)
    extra = (torch.tensor([1, 8, 15, 3]), torch.tensor([4, 9, -100, 2]), torch.tensor([3, 4, 3, 0]))
    upstream = torch.linspace(-1, 2, 5, dtype=torch.float64)

    def reference(h, w):
        logp = (h @ w.t()).log_softmax(-1).flatten(0, 1)
        y = labels.flatten()
        picked = logp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * (y != -100)
        out = torch.zeros(5, dtype=h.dtype).index_add(0, row_of, picked)
        pos, ey, erow = extra
        e = logp.index_select(0, pos).gather(1, ey.clamp(min=0)[:, None]).squeeze(1) * (ey != -100)
        return out.index_add(0, erow, e)

    def run(fn, dtype):
        h, w = (x.detach().to(dtype).clone().requires_grad_() for x in (hidden, weight))
        out = fn(h, w)
        (out * upstream.to(dtype)).sum().backward()
        return out.detach().double(), h.grad.double(), w.grad.double()

    exact = run(reference, torch.float64)
    ref32 = run(reference, torch.float32)
    ours = run(
        lambda h, w: chunked_sequence_logps(h, w, labels, chunk, row_of=row_of, rows=5, extra=extra), torch.float32
    )
    for name, o, r, e in zip(("logps", "d hidden", "d weight"), ours, ref32, exact):
        assert (o - e).abs().max() <= 2 * (r - e).abs().max() + 1e-12, name


def test_shared_prompt_config():
    assert build_objective(TrainConfig(objective="dpo", shared_prompt="off")).shared_prompt == "off"
    assert build_objective(TrainConfig(objective="orpo")).shared_prompt == "auto"

    class Flash:
        class config:  # noqa: N801
            _attn_implementation = "flash_attention_2"

    assert not shares_prompt("auto", Flash())
    with pytest.raises(ConfigError, match="shared_prompt=on"):
        shares_prompt("on", Flash())

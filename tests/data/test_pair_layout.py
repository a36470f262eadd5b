"""Shared-prompt pair rows: every token sees exactly what it sees in its own row, and the two-causal-attention plan
equals the masked attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lorafuse.accel.fast_path import _pair_attention
from lorafuse.config import DataConfig
from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.data.pair_layout import PAD, PLAN_KEYS, share_prompts, shared_prompt_mask

IGNORE = -100


@pytest.fixture(scope="module")
def pair_batch(tiny_tokenizer):
    data = DataConfig(path="builtin:preference", format="preference", prompt_format="alpaca", max_length=128)
    pairs = build_datasets(data, tiny_tokenizer)[0].subset(np.arange(10))
    return next(Batcher(pairs, 5, tiny_tokenizer.pad_token_id, pairs=True, shuffle=False).epoch_batches(0))


def _unshared(pairs: int, chosen_ids, rejected_ids, prefix_ids, answer_len=4):
    """A pair batch by hand: each pair's rows are prefix + answer, labels on the answer, right-padded with 0."""
    rows = [list(prefix_ids[b]) + list(chosen_ids[b]) for b in range(pairs)]
    rows += [list(prefix_ids[b]) + list(rejected_ids[b]) for b in range(pairs)]
    width = max(map(len, rows)) + 2
    ids = torch.zeros((2 * pairs, width), dtype=torch.long)
    labels = torch.full((2 * pairs, width), IGNORE)
    mask = torch.zeros((2 * pairs, width), dtype=torch.long)
    for i, row in enumerate(rows):
        n, p = len(row), len(prefix_ids[i % pairs])
        ids[i, :n], labels[i, p:n], mask[i, :n] = torch.tensor(row), torch.tensor(row[p:]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "right_padded": True, "num_pairs": pairs}


def _hand_batch():
    """Prompts of different lengths, answers longer and shorter than each other, one pair with no prompt at all."""
    prefix = [[5, 6, 7], [8], []]
    chosen = [[11, 12], [13, 14, 15, 16], [17, 18]]
    rejected = [[21, 22, 23, 24], [25], [26, 27, 28]]
    return _unshared(3, chosen, rejected, prefix)


def _contexts(batch):
    """Every trained prediction of the separate rows as (response, context (token, position) pairs, target)."""
    pairs, out = batch["num_pairs"], []
    for row in range(2 * pairs):
        response = row  # chosen b -> b, rejected b -> pairs + b: the rows' own order
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        for t in range(ids.shape[0] - 1):
            if labels[t + 1] != IGNORE:
                context = tuple((int(ids[j]), j) for j in range(t + 1))
                out.append((response, context, int(labels[t + 1])))
    return sorted(out)


def _shared_contexts(shared):
    """The same, read off the shared rows: what each scoring position attends to (token, position id)."""
    mask, ids, pos = shared_prompt_mask(shared["pair_segments"])[:, 0], shared["input_ids"], shared["position_ids"]
    labels, seq, (rows, width) = shared["labels"], shared["pair_seq"], shared["input_ids"].shape
    seen = lambda b, t: tuple((int(ids[b, u]), int(pos[b, u])) for u in mask[b, t].nonzero().flatten())  # noqa: E731
    out = []
    for b in range(rows):
        for t in range(width - 1):
            if labels[b, t + 1] != IGNORE:
                out.append((int(seq[b, t + 1]), seen(b, t), int(labels[b, t + 1])))
    for b, (flat, token) in enumerate(shared["pair_first"].tolist()):
        if token != IGNORE:
            assert flat // width == b
            out.append((rows + b, seen(b, flat % width), token))
    return sorted(out)


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("which", ["hand", "builtin"])
def test_each_prediction_sees_what_it_sees_in_its_own_row(which, multiple, pair_batch):
    batch = _hand_batch() if which == "hand" else pair_batch
    shared = share_prompts(batch, multiple)
    assert _shared_contexts(shared) == _contexts(batch)
    assert shared["input_ids"].shape[0] == batch["num_pairs"]
    assert shared["input_ids"].shape[1] % multiple == 0
    real = (shared["pair_segments"] != PAD).sum()
    assert real < batch["attention_mask"].sum()  # the prompts once: fewer tokens than the separate rows


def test_the_builtin_pairs_share_their_whole_prompt(pair_batch):
    shared = share_prompts(pair_batch)
    pairs = pair_batch["num_pairs"]
    for b in range(pairs):
        prompt = int((pair_batch["labels"][b] == IGNORE).long().cumprod(0).sum())  # the untrained start
        assert int((shared["pair_segments"][b] == 0).sum()) == prompt


class _Attention(nn.Module):
    """What transformers' SDPA function reads of an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.training = True, groups, False


@pytest.mark.parametrize("multiple", [1, 8])
def test_two_causal_attentions_equal_the_masked_one(multiple):
    shared = share_prompts(_hand_batch(), multiple)
    rows, width = shared["input_ids"].shape
    heads, kv_heads, dim = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, width, heads, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(rows, width, kv_heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    module = _Attention(heads // kv_heads)
    mask = shared_prompt_mask(shared["pair_segments"])
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    masked, _ = sdpa_attention_forward(module, t(q), t(k), t(v), mask, dropout=0.0, scaling=dim**-0.5)

    def call(q_, k_, v_, m):
        return sdpa_attention_forward(module, q_, k_, v_, m, dropout=0.0, scaling=dim**-0.5)

    plan = tuple(shared[k] for k in PLAN_KEYS)
    two = _pair_attention(call, q, k, v, plan)
    real = shared["pair_segments"] != PAD
    assert two.shape == masked.shape
    assert torch.allclose(two[real], masked[real], rtol=0, atol=1e-12)


@pytest.mark.gpu
def test_two_causal_attentions_in_bf16_on_the_gpu():
    """SDPA's causal kernels on the GPU (bf16, as training runs them) against the masked attention in fp32: no
    further from it than the masked attention in bf16 is (the same rounding, other kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    shared = share_prompts(_hand_batch(), 8)
    rows, width = shared["input_ids"].shape
    heads, kv_heads, dim = 8, 2, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, width, heads, dim, generator=g).cuda()
    k, v = (torch.randn(rows, width, kv_heads, dim, generator=g).cuda() for _ in range(2))
    module = _Attention(heads // kv_heads)
    mask = shared_prompt_mask(shared["pair_segments"].cuda())
    t = lambda x: x.transpose(1, 2)  # noqa: E731

    def call(q_, k_, v_, m):
        return sdpa_attention_forward(module, q_, k_, v_, m, dropout=0.0, scaling=dim**-0.5)

    exact, _ = call(t(q), t(k), t(v), mask)
    low = [x.bfloat16() for x in (q, k, v)]
    masked, _ = call(*(t(x) for x in low), mask)
    plan = tuple(shared[k].cuda() if torch.is_tensor(shared[k]) else shared[k] for k in PLAN_KEYS)
    two = _pair_attention(call, *low, plan)
    real = (shared["pair_segments"] != PAD).cuda()
    err_two = (two[real].float() - exact[real]).abs().max()
    err_masked = (masked[real].float() - exact[real]).abs().max()
    assert err_two <= 2 * err_masked + 1e-6


@pytest.mark.parametrize("multiple", [1, 8])
def test_the_inverse_maps_give_each_read_token_its_one_entry(multiple):
    """Each token of a prefix or rejected suffix is read by exactly one entry of `pair_gather`, and the inverse map
    names it; each token's output is read from exactly one result, and the assembly's inverse names the token."""
    shared = share_prompts(_hand_batch(), multiple)
    rows, width = shared["input_ids"].shape
    gather, assemble = shared["pair_gather"], shared["pair_assemble"]
    g_inv, a_inv = shared["pair_gather_inverse"], shared["pair_assemble_inverse"]
    segments = shared["pair_segments"].flatten()
    attended = (segments == 0) | (segments == 2)  # prefix and rejected suffix: the second attention's tokens
    assert torch.equal(g_inv != len(gather), attended)
    assert torch.equal(gather[g_inv[attended]], attended.nonzero().flatten())
    named = a_inv != rows * width
    assert torch.equal(assemble[a_inv[named]], named.nonzero().flatten())
    real = (segments != PAD).nonzero().flatten()
    assert set(real.tolist()) <= set(a_inv[named].tolist())  # every real token's output has its source named


def _scatter_reference(call, q, k, v, layout):
    """The two attentions with index_select's own backward (a scatter-add): what the inverse maps must equal."""
    split, gather, assemble = layout[:3]
    rows, width = q.shape[:2]
    firsts = (x[:, :split].transpose(1, 2) for x in (q, k, v))
    seconds = (x.flatten(0, 1).index_select(0, gather).unflatten(0, (rows, -1)).transpose(1, 2) for x in (q, k, v))
    both = torch.cat([call(*firsts, None)[0], call(*seconds, None)[0]], 1).flatten(0, 1)
    return both.index_select(0, assemble).unflatten(0, (rows, width))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("multiple", [1, 8])
def test_inverse_gathers_give_the_scatter_add_gradients(multiple, dtype):
    """A loss on the real tokens' outputs: the gradients of q, k and v through the two attentions' inverse-map
    backward equal index_select's scatter-add backward bit for bit (the entries it leaves out carry exact zeros)."""
    shared = share_prompts(_hand_batch(), multiple)
    rows, width = shared["input_ids"].shape
    heads, kv_heads, dim = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, width, heads, dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, width, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(rows, width, heads, dim, generator=g).to(dtype)
    real = shared["pair_segments"] != PAD
    module = _Attention(heads // kv_heads)
    plan = tuple(shared[key] for key in PLAN_KEYS)

    def call(q_, k_, v_, m):
        return sdpa_attention_forward(module, q_, k_, v_, m, dropout=0.0, scaling=dim**-0.5)

    def grads(attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attention(call, *leaves, plan)
        (out[real] * weight[real]).float().sum().backward()
        return out.detach(), [x.grad for x in leaves]

    out_scatter, scatter = grads(_scatter_reference)
    out_inverse, inverse = grads(_pair_attention)
    assert torch.equal(out_inverse, out_scatter)
    for a, b in zip(inverse, scatter):
        assert torch.equal(a, b)
    assert all(bool(x.abs().sum() > 0) for x in inverse)

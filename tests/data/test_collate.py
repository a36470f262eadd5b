"""Batcher: padding, determinism/resume, sharding, packing with block-diagonal attention (loss-equivalence)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorafuse.config import DataConfig
from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher, block_causal_mask, model_inputs, pack_best_fit

IGNORE = -100


def _demo(tok, n=None):
    return build_datasets(DataConfig(path="builtin:demo", format="alpaca", num_rows=n), tok)[0]


def test_padding_batches(tiny_tokenizer):
    ds = _demo(tiny_tokenizer, 10)
    b = next(Batcher(ds, 4, tiny_tokenizer.pad_token_id, shuffle=False).epoch_batches(0))
    lens = [len(ds[i]["input_ids"]) for i in range(4)]
    assert b["input_ids"].shape == (4, max(lens)) and b["input_ids"].dtype == torch.long
    for r, n in enumerate(lens):
        assert b["input_ids"][r, :n].tolist() == ds[r]["input_ids"]
        assert b["labels"][r, :n].tolist() == ds[r]["labels"]
        assert (b["input_ids"][r, n:] == tiny_tokenizer.pad_token_id).all() and (b["labels"][r, n:] == IGNORE).all()
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (max(lens) - n)
    assert b["num_target_tokens"] == sum(sum(lab != IGNORE for lab in ds[i]["labels"]) for i in range(4))
    assert b["num_tokens"] == sum(lens)


def test_pad_equal_to_eos_keeps_eos_trained(pad_eos_tokenizer):
    tok = pad_eos_tokenizer
    ds = _demo(tok, 8)
    b = next(Batcher(ds, 8, tok.pad_token_id, shuffle=False).epoch_batches(0))
    eos = tok.eos_token_id
    for r in range(8):
        n = len(ds[r]["input_ids"])
        assert b["input_ids"][r, n - 1] == eos and b["labels"][r, n - 1] == eos  # the real EOS: trained
        assert (b["labels"][r, n:] == IGNORE).all()  # the pads (also id eos): not
    assert int((b["labels"] == eos).sum()) == 8
    eos_as_pad = int((b["input_ids"] == eos).sum()) - 8
    assert eos_as_pad > 0  # precondition: some rows were padded with the EOS id


def test_order_is_deterministic_per_epoch_and_independent_of_global_rng(tiny_tokenizer):
    ds = _demo(tiny_tokenizer, 30)
    batcher = Batcher(ds, 4, 0, seed=3)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    first = [b["input_ids"] for b in batcher.epoch_batches(1)]
    torch.manual_seed(123), np.random.seed(9), random.seed(5)
    torch.rand(10), np.random.rand(7)
    again = [b["input_ids"] for b in Batcher(ds, 4, 0, seed=3).epoch_batches(1)]
    assert len(first) == len(batcher) == 8 and all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch = [b["input_ids"] for b in batcher.epoch_batches(2)]
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, other_epoch))
    seen = sorted(tuple(row[row != 0].tolist()) for b in first for row in b)
    assert seen == sorted(tuple(ds[i]["input_ids"]) for i in range(30))  # each example exactly once
    resumed = [b["input_ids"] for b in batcher.epoch_batches(1, start=5)]
    assert all(torch.equal(a, b) for a, b in zip(first[5:], resumed)) and len(resumed) == 3


def test_shards_are_disjoint_and_equal_length(tiny_tokenizer):
    ds = _demo(tiny_tokenizer, 30)
    shards = [Batcher(ds, 2, 0, seed=1, num_shards=3, shard=s) for s in range(3)]
    assert [len(s) for s in shards] == [5, 5, 5]
    rows = [tuple(r[r != 0].tolist()) for s in shards for b in s.epoch_batches(0) for r in b["input_ids"]]
    assert len(rows) == len(set(rows)) == 30


def test_best_fit_packing_bins():
    lengths = np.array([90, 10, 60, 40, 30, 70, 50, 50, 20, 80])
    bins = pack_best_fit(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(10))
    assert all(lengths[b].sum() <= 100 for b in bins)
    assert len(bins) == 5  # total 500 in bins of 100: best-fit decreasing finds the perfect packing here


def test_packed_batch_structure(tiny_tokenizer):
    ds = _demo(tiny_tokenizer, 20)
    batcher = Batcher(ds, 2, tiny_tokenizer.pad_token_id, packing=True, max_length=200, seed=0)
    examples = []
    for b in batcher.epoch_batches(0):
        B, T = b["input_ids"].shape
        assert "attention_mask" not in b  # a 2-D all-ones mask would switch off transformers' packed detection
        mask = block_causal_mask(b["position_ids"])
        assert T <= 200 and mask.shape == (B, 1, T, T) and mask.dtype == torch.bool
        for r, lens in enumerate(b["seq_lens"]):
            pos = 0
            segments = list(lens) + ([T - sum(lens)] if sum(lens) < T else [])
            for n in segments:
                assert b["position_ids"][r, pos : pos + n].tolist() == list(range(n))
                block = mask[r, 0, pos : pos + n, pos : pos + n]
                assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
                pos += n
            m = mask[r, 0]
            assert int(m.sum()) == sum(n * (n + 1) // 2 for n in segments)  # nothing outside the blocks
            off = 0
            for n in lens:
                examples.append(tuple(b["input_ids"][r, off : off + n].tolist()))
                assert b["labels"][r, off] == IGNORE  # a sequence's first token is never a target
                off += n
        cu = b["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == B * T and b["max_seqlen"] == max(np.diff(cu))
        assert b["num_target_tokens"] == int((b["labels"] != IGNORE).sum())
    assert sorted(examples) == sorted(tuple(ds[i]["input_ids"]) for i in range(20))


def _seq_losses(model, batch, kw):
    """(summed CE of every real sequence in (row, position) order, logits) from one forward pass."""
    with torch.no_grad():
        logits = model(**kw).logits.float()
    out = []
    for r, lens in enumerate(batch["seq_lens"]):
        pos = 0
        for n in lens:
            out.append(
                F.cross_entropy(
                    logits[r, pos : pos + n - 1],
                    batch["labels"][r, pos + 1 : pos + n],
                    ignore_index=IGNORE,
                    reduction="sum",
                ).item()
            )
            pos += n
    return out, logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_and_need_the_block_mask(tiny_tokenizer, impl):
    """Per-sequence losses, packed vs one padded batch, on a tiny random fp32 Llama.

    Bound: 1e-5 relative, or 2x the difference between two valid unpacked evaluations (the padded batch in two
    row orders) if that is larger. fp32 unit roundoff is 6e-8 and the longest reduction in this model is 128
    terms, so a reordered sum can move a value by about 128 * 6e-8 = 7.7e-6 relative; masked keys add exact
    zeros. The negative control (causal attention over the whole packed row) must exceed the bound 100-fold.
    """
    from lorafuse.model.tiny import build_tiny_model

    n = 12
    ds = _demo(tiny_tokenizer, n)
    model = build_tiny_model("llama", tokenizer=tiny_tokenizer).eval()
    model.config._attn_implementation = impl
    padded = next(Batcher(ds, n, 0, shuffle=False).epoch_batches(0))
    ref = np.array(_seq_losses(model, padded, model_inputs(padded, impl))[0])
    flipped = next(Batcher(ds.subset(np.arange(n)[::-1]), n, 0, shuffle=False).epoch_batches(0))
    noise = np.abs(ref - np.array(_seq_losses(model, flipped, model_inputs(flipped, impl))[0][::-1])).max()
    bound = np.maximum(2 * noise, 1e-5 * np.abs(ref))

    packer = Batcher(ds, n, 0, packing=True, max_length=256, shuffle=False)
    assert len(packer) == 1 and max(len(u) for u in packer.units) >= 3  # one batch; rows hold several sequences
    order = [i for u in packer.units for i in u]
    b = next(packer.epoch_batches(0))
    losses, logits = _seq_losses(model, b, model_inputs(b, impl))
    # no mask and no cache (as in training): transformers >= 5 derives the blocks from the position_ids restarts
    auto = _seq_losses(model, b, {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "use_cache": False})[
        0
    ]
    unmasked = _seq_losses(model, b, {**model_inputs(b, impl), "attention_mask": torch.ones_like(b["input_ids"])})[0]
    packed, auto, unmasked = (np.array([dict(zip(order, x))[i] for i in range(n)]) for x in (losses, auto, unmasked))
    assert (np.abs(packed - ref) <= bound).all(), np.abs(packed - ref).max()
    assert (np.abs(auto - ref) <= bound).all(), np.abs(auto - ref).max()
    # the loop's way, one shifted CE over whole packed rows: no loss term crosses a sequence boundary
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    ).item()
    assert abs(total - ref.sum()) <= bound.sum()
    assert np.abs(unmasked - ref).max() > 100 * bound.max()


def test_model_inputs_per_attention_implementation(tiny_tokenizer):
    ds = _demo(tiny_tokenizer, 6)
    b = next(Batcher(ds, 2, 0, packing=True, max_length=256).epoch_batches(0))
    eager = model_inputs(b, "eager", torch.bfloat16)
    m, allowed = eager["attention_mask"], block_causal_mask(b["position_ids"])
    assert m.dtype == torch.bfloat16 and (m[allowed] == 0).all()
    assert (m[~allowed] == torch.finfo(torch.bfloat16).min).all()
    flash = model_inputs(b, "flash_attention_2")
    assert "attention_mask" not in flash and torch.equal(flash["position_ids"], b["position_ids"])
    assert model_inputs(b, "sdpa")["attention_mask"].dtype == torch.bool
    padded = next(Batcher(ds, 2, 0).epoch_batches(0))
    assert padded["right_padded"] and (padded["attention_mask"] == 0).any()
    assert set(model_inputs(padded)) == set(model_inputs(padded, "eager")) == {"input_ids"}
    assert set(model_inputs(padded, "flash_attention_2")) == {"input_ids", "attention_mask"}  # it unpads
    foreign = {k: v for k, v in padded.items() if k != "right_padded"}  # someone else's batch: padding side unknown
    assert set(model_inputs(foreign)) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_right_padded_rows_train_the_same_without_the_mask(tiny_tokenizer, impl):
    """Right-padded rows under causal attention: no real token sees a pad, and pads carry no loss, so the loss
    and every LoRA gradient are the masked forward's. fp32; bound 1e-5 relative (masked keys add exact zeros,
    so only the reduction order may differ). Negative control: the same rows left-padded without their mask
    move the loss 100-fold past the bound."""
    from lorafuse.model.inject import apply_lora
    from lorafuse.model.tiny import build_tiny_model

    ds = _demo(tiny_tokenizer, 6)
    model = build_tiny_model("llama", tokenizer=tiny_tokenizer)
    model.config._attn_implementation = impl
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    b = next(Batcher(ds, 6, 0, shuffle=False).epoch_batches(0))
    assert (b["attention_mask"] == 0).any()

    def run(kw, labels):
        model.zero_grad(set_to_none=True)
        logits = model(**kw).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
        )
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, logits

    real = b["attention_mask"].bool()
    masked, masked_grads, masked_logits = run(
        {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]
    )
    kw = model_inputs(b, impl)
    assert "attention_mask" not in kw
    loss, grads, logits = run(kw, b["labels"])
    assert abs(loss - masked) <= 1e-5 * abs(masked)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-5, atol=1e-5 * grad.abs().max().item())
    bound = 1e-5 * masked_logits[real].abs().max()
    assert (logits[real] - masked_logits[real]).abs().max() <= bound
    # left padding: the real tokens would attend to the pads before them
    shift = [int(b["input_ids"].shape[1] - n) for n in real.sum(1)]
    left = {k: torch.stack([r.roll(n) for r, n in zip(b[k], shift)]) for k in ("input_ids", "labels", "attention_mask")}
    left_real = left["attention_mask"].bool()
    with_mask = run({"input_ids": left["input_ids"], "attention_mask": left["attention_mask"]}, left["labels"])[2]
    without = run({"input_ids": left["input_ids"]}, left["labels"])[2]
    assert (without[left_real] - with_mask[left_real]).abs().max() > 100 * bound


def test_pad_to_multiple_rounds_up_but_never_past_max_length(tiny_tokenizer):
    """CUDA runs pad to a multiple of 64 (few shapes for CUDA graphs); the width never exceeds max_length, and
    the extra pads carry no loss and no attention, so the loss is the unrounded batch's."""
    ds = _demo(tiny_tokenizer, 12)
    longest = max(len(ds[i]["input_ids"]) for i in range(4))
    plain = next(Batcher(ds, 4, 0, shuffle=False).epoch_batches(0))
    rounded = next(Batcher(ds, 4, 0, shuffle=False, pad_to_multiple_of=64, max_length=512).epoch_batches(0))
    assert plain["input_ids"].shape[1] == longest and rounded["input_ids"].shape[1] == -(-longest // 64) * 64
    extra = rounded["input_ids"].shape[1] - longest
    assert (rounded["labels"][:, longest:] == IGNORE).all() and (rounded["attention_mask"][:, longest:] == 0).all()
    assert extra > 0 and rounded["num_target_tokens"] == plain["num_target_tokens"]
    capped = next(Batcher(ds, 4, 0, shuffle=False, pad_to_multiple_of=64, max_length=longest + 1).epoch_batches(0))
    assert capped["input_ids"].shape[1] == longest + 1

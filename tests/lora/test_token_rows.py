"""Trainable token rows in peft's format: peft loads ours and we load peft's (same logits), tied and untied tables,
new tokens (a grown vocabulary) through peft + transformers, and merge writes the rows into the tables.

Tolerance rule (as tests/lora/test_adapter_io.py): the truth is peft's model run in float64 on the same weights; our
fp32 logits must be within 2x the error of peft's own fp32 logits from that truth, and every adapter moves the
logits far more than that bound (its rows are random, not the base's).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafuse.artifacts.adapter_io import save_adapter
from lorafuse.artifacts.adapter_load import load_adapter
from lorafuse.artifacts.merge import merge
from lorafuse.lora import token_rows
from lorafuse.model.inject import apply_lora
from lorafuse.model.load import load_model
from lorafuse.model.new_tokens import add_tokens
from lorafuse.model.tiny import build_tiny_model

IDS = [4, 5, 9]  # <|im_start|>, <|im_end|> and an ordinary token of the tiny tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    build_tiny_model("llama", tokenizer=tiny_tokenizer, tie_word_embeddings=request.param).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _ids(tokenizer, extra=()) -> torch.Tensor:
    text = "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\nRed, blue.<|im_end|>"
    ids = tokenizer(text)["input_ids"] + list(extra)
    return torch.tensor([ids, ids[::-1]])


def _ours(base_dir, ids=IDS, seed=0):
    """A LoRA model with trainable rows for `ids`, every trainable tensor random (B and the rows too)."""
    model, tok = load_model(base_dir, quant="none", compute_dtype="float32", device="cpu")
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    emb, head, tied = token_rows.tables(model)
    g = torch.Generator().manual_seed(seed)
    rows = lambda t: torch.randn(len(ids), t.weight.shape[1], generator=g)  # noqa: E731
    token_rows.attach(model, ids, rows(emb), None if tied else rows(head))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def _peft_truth(base_dir, adapter_dir, ids, vocab=None):
    """peft's logits in fp32 and fp64 for the adapter on a transformers base (resized to `vocab` when given)."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        if vocab is not None:
            base.resize_token_embeddings(vocab)
        out[dtype] = _logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)
    return out[torch.float32], out[torch.float64]


def _assert_same_function(ours, peft32, peft64, unadapted):
    bound = 2 * (peft32 - peft64).abs().max()
    err = (ours - peft64).abs().max()
    assert err <= bound, f"lorafuse vs peft (fp64) {err:.3g} > 2 x peft's own fp32 error ({bound:.3g})"
    assert (unadapted - peft64).abs().max() > 1000 * bound, "the adapter must change the logits"


def test_peft_loads_our_rows_with_the_same_logits(base_dir, tmp_path):
    model, tok = _ours(base_dir)
    ids = _ids(tok)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tied = token_rows.state(model).tied
    assert config["trainable_token_indices"] == (IDS if tied else {"embed_tokens": IDS, "lm_head": IDS})
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    _assert_same_function(_logits(model, ids), *_peft_truth(base_dir, tmp_path / "adapter", ids), _logits(base, ids))


def test_we_load_peft_rows_with_the_same_logits(base_dir, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tied = base.config.tie_word_embeddings
    indices = IDS if tied else {"embed_tokens": IDS, "lm_head": IDS}
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    model, tok = load_model(base_dir, quant="none", compute_dtype="float32", device="cpu")
    load_adapter(model, tmp_path / "peft")
    assert token_rows.state(model).ids == IDS
    ids = _ids(tok)
    unadapted = _logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), ids)
    _assert_same_function(_logits(model, ids), *_peft_truth(base_dir, tmp_path / "peft", ids), unadapted)


def test_our_reload_is_exact_and_only_the_rows_train(base_dir, tmp_path):
    model, tok = _ours(base_dir)
    trained = {n: p.shape for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    width = model.get_input_embeddings().weight.shape[1]
    assert set(trained.values()) == {torch.Size([len(IDS), width])}, "only (k, D) row tensors train, not a table"
    assert not model.get_input_embeddings().weight.requires_grad
    save_adapter(model, tmp_path / "adapter")
    again, _ = load_model(base_dir, quant="none", compute_dtype="float32", device="cpu")
    load_adapter(again, tmp_path / "adapter")
    ids = _ids(tok)
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_new_tokens_resize_save_and_reload_in_peft_and_transformers(base_dir, tmp_path):
    model, tok = load_model(base_dir, quant="none", compute_dtype="float32", device="cpu")
    before = len(tok)
    new = add_tokens(model, tok, ["<|tool|>", "<|im_start|>", "<|result|>"])  # <|im_start|> exists already
    assert new == [before, before + 1] and len(tok) == before + 2
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == before + 2
    assert torch.allclose(emb[new[0]], emb[new[1]]) and emb[new].norm() > 0, "new rows start at one mean vector"
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    emb, head, tied = token_rows.tables(model)
    g = torch.Generator().manual_seed(1)
    values = lambda t: torch.randn(len(new), t.weight.shape[1], generator=g)  # noqa: E731
    token_rows.attach(model, new, values(emb), None if tied else values(head))
    save_adapter(model, tmp_path / "adapter", tokenizer=tok)

    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert len(reloaded_tok) == len(tok)
    ids = _ids(reloaded_tok, extra=new)
    assert json.loads((tmp_path / "adapter" / "lorafuse.json").read_text())["vocab_size"] == before + 2
    peft32, peft64 = _peft_truth(base_dir, tmp_path / "adapter", ids, vocab=len(reloaded_tok))
    grown = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    grown.resize_token_embeddings(len(reloaded_tok))
    _assert_same_function(_logits(model.eval(), ids), peft32, peft64, _logits(grown, ids))

    ours, _ = load_model(base_dir, quant="none", compute_dtype="float32", device="cpu")
    load_adapter(ours, tmp_path / "adapter")  # grows the base to lorafuse.json's vocab_size itself
    assert torch.equal(_logits(ours, ids), _logits(model, ids))


def test_merge_writes_the_rows_into_the_tables(base_dir, tmp_path):
    model, tok = _ours(base_dir)
    save_adapter(model, tmp_path / "adapter")
    result = merge(base_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    rows = token_rows.state(model)
    assert torch.equal(merged.get_input_embeddings().weight[IDS], rows.embed_rows.values)
    if not rows.tied:
        assert torch.equal(merged.get_output_embeddings().weight[IDS], rows.head_rows.values)
    ids = _ids(tok)
    assert (_logits(merged, ids) - _logits(model, ids)).abs().max() <= result.tolerance
    state = merged.state_dict()
    assert not any("token_adapter" in k for k in state), "the merged folder holds plain tables"


def test_adapters_disabled_switches_the_rows_off_too(base_dir):
    """DPO's reference model (lora/disable.py): the base's own rows, as peft's disable_adapter gives them."""
    from lorafuse.lora.disable import adapters_disabled

    model, tok = _ours(base_dir)
    ids = _ids(tok)
    with adapters_disabled(model):
        off = _logits(model, ids)
        assert token_rows.head_rows(model) is None
    base, _ = load_model(base_dir, quant="none", compute_dtype="float32", device="cpu")
    assert torch.equal(off, _logits(base.eval(), ids))
    assert token_rows.head_rows(model) is not None and not torch.equal(_logits(model, ids), off)

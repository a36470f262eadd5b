"""Finding untrained token rows on a tiny model (zeroed, shrunk, copied rows; a control with none), the rows a run
gives them, and a chat template's markers that the vocabulary lacks."""

from __future__ import annotations

import copy

import numpy as np
import torch

from lorafuse.lora import token_rows
from lorafuse.model import untrained_tokens
from lorafuse.model.new_tokens import template_markers
from lorafuse.model.tiny import build_tiny_model
from lorafuse.model.untrained_tokens import check_table, check_tokens, fresh_rows, give_rows, report_lines, table_checks

ALL = np.arange(64)  # the tokens "the data uses" in these tests


def _model(tokenizer, tied=False):
    model = build_tiny_model("llama", tokenizer=tokenizer, tie_word_embeddings=tied, seed=3)
    with torch.no_grad():  # a control without any untrained row: HF zeroes the pad row at init
        emb = model.get_input_embeddings().weight
        emb[tokenizer.pad_token_id] = torch.randn(emb.shape[1]) * 0.02
    return model.requires_grad_(False)  # frozen, as load_model gives it


def test_a_trained_looking_model_has_no_untrained_rows(tiny_tokenizer):
    report = check_tokens(table_checks(_model(tiny_tokenizer), ALL), ALL, tiny_tokenizer)
    assert report.ids == [] and report.used == 64
    assert report_lines(report, True) == ["untrained token rows: none among the 64 tokens the data uses"]


def test_zeroed_shrunk_and_copied_rows_are_found_with_their_reason(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[[4, 5]] = 0  # <|im_start|>, <|im_end|>: zero in both tables, as in Llama-3 base
        head[[4, 5]] = 0
        emb[9] *= 1e-3  # 1000x below a typical row
        head[[20, 21, 22]] = head[30].clone()  # placeholder rows copied from one vector
        emb[41] = emb[40].clone()  # one copy of a trained row (a token added as an alias): left alone
        push = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(1))
        head[[50, 51, 52]] += 3 * push  # never targets in pretraining: pushed down along one shared direction
        emb[100] = 0  # untrained, but not a token the data uses
    report = check_tokens(table_checks(model, ALL), ALL, tiny_tokenizer)
    assert report.ids == [4, 5, 9, 20, 21, 22, 30, 50, 51, 52]
    assert report.reasons[4] == ["embedding all zero", "head all zero"]
    assert report.reasons[9][0].startswith("embedding norm 0.001") and "x the median" in report.reasons[9][0]
    assert report.reasons[21] == ["head identical to 3 other rows"]
    assert report.reasons[51] == ["head nearly identical (cosine >= 0.95) to 2 other rows"]
    assert report.names[4] == "<|im_start|>"
    text = "\n".join(report_lines(report, True))
    assert "10 of the 64 tokens the data uses look untrained" in text and "'<|im_end|>' (id 5)" in text


def test_near_copies_are_skipped_on_a_cpu_above_the_budget_and_the_report_says_so(tiny_tokenizer, monkeypatch):
    from lorafuse.model import untrained_tokens

    monkeypatch.setattr(untrained_tokens, "NEAR_BUDGET", 0)
    report = check_tokens(table_checks(_model(tiny_tokenizer), ALL), ALL, tiny_tokenizer)
    assert all(t.near is None for t in report.tables)
    assert "near copies not checked in the embedding and head here" in report_lines(report, True)[-1]


def test_rows_start_at_the_mean_of_the_trained_rows_and_keep_trained_values(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[[4, 5]] = 0
        head[5] = 0  # token 4's head row is trained: it keeps its value
    report = check_tokens(table_checks(model, ALL), ALL, tiny_tokenizer)
    assert give_rows(model, report, "auto", init="mean") == [4, 5]
    e_rows = token_rows.state(model).embed_rows.values
    h_rows = token_rows.state(model).head_rows.values
    trained_e = torch.ones(emb.shape[0], dtype=torch.bool)
    trained_e[[4, 5]] = False
    trained_h = torch.ones(head.shape[0], dtype=torch.bool)
    trained_h[5] = False
    assert torch.allclose(e_rows, emb[trained_e].mean(0).expand(2, -1), atol=1e-7)
    assert torch.equal(h_rows[0], head[4]) and torch.allclose(h_rows[1], head[trained_h].mean(0), atol=1e-7)
    assert e_rows.requires_grad and not emb.requires_grad
    token_rows.detach(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_sampled_embedding_rows_are_distinct_draws_and_head_rows_start_at_the_mean(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[[4, 5, 6]] = 0
        head[5] = 0
    report = check_tokens(table_checks(model, ALL), ALL, tiny_tokenizer)
    assert give_rows(model, report, "auto", init="sample", seed=7) == [4, 5, 6]
    e_rows = token_rows.state(model).embed_rows.values.detach()
    h_rows = token_rows.state(model).head_rows.values.detach()
    assert torch.equal(h_rows[0], head[4]) and torch.equal(h_rows[2], head[6])  # trained head rows as they were
    trained = torch.ones(emb.shape[0], dtype=torch.bool)
    trained[[4, 5, 6]] = False
    spread = emb[trained].std(0, unbiased=False)
    z = (e_rows - emb[trained].mean(0)) / spread  # each sampled row in units of the trained rows' spread
    assert torch.cdist(e_rows, e_rows)[~torch.eye(3, dtype=torch.bool)].min() > 0.5 * spread.norm()  # distinct
    assert 0.5 < float(z.square().mean().sqrt()) < 1.5  # as far from the mean as a trained row, not at it
    trained_h = torch.ones(head.shape[0], dtype=torch.bool)
    trained_h[5] = False
    assert torch.allclose(h_rows[1], head[trained_h].mean(0), atol=1e-7)  # a typical starting probability
    token_rows.detach(model)
    give_rows(model, report, "auto", init="sample", seed=7)
    assert torch.equal(token_rows.state(model).embed_rows.values.detach(), e_rows)  # the seed decides the draw
    token_rows.detach(model)
    give_rows(model, report, "auto", init="sample", seed=8)
    assert not torch.equal(token_rows.state(model).embed_rows.values.detach(), e_rows)


def test_the_table_spread_summed_over_row_ranges_and_the_samples_follow_it(monkeypatch):
    monkeypatch.setattr(untrained_tokens, "RANGE", 100)  # the sums cross many row ranges
    g = torch.Generator().manual_seed(0)
    center, scale = torch.linspace(-3, 3, 16), torch.linspace(0.01, 2.0, 16)
    table = (center + scale * torch.randn(1000, 16, generator=g)).to(torch.bfloat16)
    table[[10, 500, 999]] = 0
    check = check_table("embedding", lambda a, b: table[a:b], 1000)
    kept = table.float()[check.untrained.logical_not()]
    assert check.untrained.sum() == 3
    assert torch.allclose(check.mean, kept.mean(0), atol=1e-5, rtol=1e-5)
    assert torch.allclose(check.std, kept.std(0, unbiased=False), atol=1e-5, rtol=1e-5)
    rows = fresh_rows(check, 20000, "sample", torch.Generator().manual_seed(1))
    n = rows.shape[0]
    assert ((rows.mean(0) - check.mean).abs() < 5 * check.std / n**0.5).all()
    assert ((rows.std(0) / check.std - 1).abs() < 0.05).all()
    assert torch.equal(fresh_rows(check, 2, "mean", g), check.mean.expand(2, -1))


def test_the_report_says_where_the_rows_start(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight[4] = 0
    report = check_tokens(table_checks(model, ALL), ALL, tiny_tokenizer)
    assert "embedding rows each drawn around the trained rows" in "\n".join(report_lines(report, True, "sample"))
    assert "started at the mean of the trained rows" in "\n".join(report_lines(report, True, "mean"))


def test_off_gives_rows_to_new_tokens_only(tiny_tokenizer):
    model = _model(tiny_tokenizer, tied=True)
    with torch.no_grad():
        model.get_input_embeddings().weight[[4, 5]] = 0
    report = check_tokens(table_checks(model, ALL), ALL, tiny_tokenizer, new_ids=[63])
    assert report.ids == [4, 5, 63] and report.reasons[63] == ["new token (added to the vocabulary)"]
    assert give_rows(model, report, "off") == [63]
    assert token_rows.state(model).ids == [63] and token_rows.state(model).tied
    assert "the existing rows are left as they are" in report_lines(report, False)[-1]


def test_template_markers_the_vocabulary_lacks(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    assert template_markers(tok) == []  # <|im_start|>, <|im_end|> are tokens of the tiny vocabulary
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|turn|>")
    assert template_markers(tok) == ["<|turn|>"]


def test_a_table_trained_whole_starts_its_flagged_rows_in_place(tiny_tokenizer):
    """lora.modules_to_save: [embed_tokens, lm_head]: no token rows are attached (the tables train whole), but their
    zeroed rows start as they would as token rows (embedding drawn around the trained rows, head at the mean), in
    the tables themselves; every other row keeps its value; the report says where they train."""
    model = _model(tiny_tokenizer)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[[4, 5]] = 0
        head[[4, 5]] = 0
    before_e, before_h = emb.detach().clone(), head.detach().clone()
    emb.requires_grad_(True)
    head.requires_grad_(True)
    report = check_tokens(table_checks(model, ALL), ALL, tiny_tokenizer)
    assert give_rows(model, report, "auto", init="sample", seed=7) == []
    assert token_rows.state(model) is None
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[[4, 5]] = False
    assert torch.equal(emb[others], before_e[others]) and torch.equal(head[others], before_h[others])
    spread = before_e[others].std(0, unbiased=False)
    assert (emb[4] - emb[5]).norm() > 0.5 * spread.norm()  # two distinct draws, not zeros, not one vector
    assert torch.allclose(head[4], before_h[others].mean(0), atol=1e-7) and torch.equal(head[4], head[5])
    assert emb.requires_grad and head.requires_grad
    text = "\n".join(report_lines(report, True, "sample", ["embedding", "head"]))
    assert "the embedding and the head are trained whole (lora.modules_to_save)" in text

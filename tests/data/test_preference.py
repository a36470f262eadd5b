"""data.format=preference: row layouts, prompt rendering, response-only labels, bad pairs, pair batches, preview."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.data.preference import DROP_EMPTY, DROP_PROMPT, DROP_SAME
from lorafuse.errors import DataError
from lorafuse.preview import preview


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _build(tmp_path, tok, make_cfg, rows, **cfg):
    return build_datasets(make_cfg(path=_write(tmp_path, rows), format="preference", **cfg), tok)


def _parts(ds, tok, row):
    """(prompt text, trained text) of a data set row."""
    ex = ds[row]
    start = next(t for t, lab in enumerate(ex["labels"]) if lab != -100)
    assert all(lab != -100 for lab in ex["labels"][start:])  # one trained run: the response, to the row's end
    return tok.decode(ex["input_ids"][:start]), tok.decode(ex["input_ids"][start:])


def test_string_pairs_train_the_response_and_eos_only(tiny_tokenizer, make_cfg, tmp_path):
    tok = tiny_tokenizer
    rows = [{"prompt": "Name a color:", "chosen": " Red.", "rejected": " Blue."}]
    ds, val, stats = _build(tmp_path, tok, make_cfg, rows)
    assert len(ds) == 2 and val is None and stats.rows_train == 1 and stats.template == "plain"
    assert _parts(ds, tok, 0) == ("<s>Name a color:", " Red.</s>")  # raw prompt, response as written, EOS trained
    assert _parts(ds, tok, 1) == ("<s>Name a color:", " Blue.</s>")
    assert list(ds.rows) == [0, 0]


@pytest.mark.parametrize(
    ("prompt_format", "heads"),
    [("alpaca", ("### Instruction:", "### Response:")), ("dolly-ja", ("### 指示:", "### 回答:"))],
)
def test_instruction_fields_get_the_sft_headings(tiny_tokenizer, make_cfg, tmp_path, prompt_format, heads):
    rows = [
        {"instruction": "何色ですか。", "input": "空", "chosen": "青です。", "rejected": "Blue.", "system": "短く。"}
    ]
    ds, _, _ = _build(tmp_path, tiny_tokenizer, make_cfg, rows, prompt_format=prompt_format)
    prompt, response = _parts(ds, tiny_tokenizer, 0)
    assert prompt.startswith("<s>短く。\n\n" + heads[0] + "\n何色ですか。") and prompt.endswith(heads[1] + "\n")
    assert "空" in prompt and response == "青です。</s>"


def test_conversational_pairs_use_the_chat_template(tiny_tokenizer, make_cfg, tmp_path):
    tok = tiny_tokenizer
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Color of the sky?"},
    ]
    implicit = {
        "chosen": history + [{"role": "assistant", "content": "Blue."}],
        "rejected": history + [{"role": "assistant", "content": "Green."}],
    }
    explicit = {
        "prompt": json.dumps(history),  # a JSON string column, as CSV exports store it
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": "Green.",  # a string response is one assistant message
    }
    ds, _, stats = _build(tmp_path, tok, make_cfg, [implicit, explicit])
    assert stats.template == "chat" and len(ds) == 4
    for row, answer in ((0, "Blue."), (1, "Green."), (2, "Blue."), (3, "Green.")):
        prompt, response = _parts(ds, tok, row)
        assert response == f"{answer}<|im_end|></s>"  # the template's end of turn and EOS, not its newline after
        assert prompt.endswith("<|im_start|>assistant\n") and "Hello!<|im_end|>" in prompt  # history: not trained
    assert ds[0]["input_ids"] == ds[2]["input_ids"]


def test_bad_pairs_are_dropped_and_counted(tiny_tokenizer, make_cfg, tmp_path):
    good = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    rows = [
        good,
        {"prompt": "Q:", "chosen": "  ", "rejected": " no"},
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},
        {"prompt": "long " * 40, "chosen": " yes", "rejected": " no"},
    ]
    ds, _, stats = _build(tmp_path, tiny_tokenizer, make_cfg, rows, max_length=32)
    assert len(ds) == 2 and stats.rows_read == 4 and stats.rows_used == 1
    assert stats.dropped == {DROP_EMPTY: 1, DROP_SAME: 1, DROP_PROMPT: 1}
    assert any("line 4" in w for w in stats.dropped_where[DROP_PROMPT])
    with pytest.raises(DataError, match="no usable preference pair") as e:
        _build(tmp_path, tiny_tokenizer, make_cfg, rows[1:], max_length=32)
    assert "data.max_length" in e.value.fix


def test_long_pairs_keep_their_start(tiny_tokenizer, make_cfg, tmp_path):
    rows = [{"prompt": "Q:", "chosen": " yes" * 30, "rejected": " no"}]
    ds, _, stats = _build(tmp_path, tiny_tokenizer, make_cfg, rows, max_length=16)
    assert len(ds[0]["input_ids"]) == 16 and stats.truncated == 1 and not stats.dropped


def test_field_mapping_and_row_errors(tiny_tokenizer, make_cfg, tmp_path):
    rows = [{"question": "Q:", "good": " yes", "bad": " no"}]
    ds, _, _ = _build(
        tmp_path, tiny_tokenizer, make_cfg, rows, fields={"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    assert _parts(ds, tiny_tokenizer, 1)[1] == " no</s>"
    with pytest.raises(DataError, match="has no 'chosen' field"):
        _build(tmp_path, tiny_tokenizer, make_cfg, rows, fields={"prompt": "question"})
    with pytest.raises(DataError, match="has no prompt"):
        _build(tmp_path, tiny_tokenizer, make_cfg, [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="does not use"):
        _build(tmp_path, tiny_tokenizer, make_cfg, rows, fields={"output": "good"})
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    multi = {
        "chosen": turns + [{"role": "assistant", "content": "d"}],
        "rejected": turns + [{"role": "assistant", "content": "e"}],
    }
    with pytest.raises(DataError, match="multi-turn prompt"):
        _build(tmp_path, tiny_tokenizer, make_cfg, [multi], template="plain")
    uneven = {"chosen": turns[:2], "rejected": turns + [{"role": "assistant", "content": "e"}]}
    with pytest.raises(DataError, match="differ only in assistant messages"):
        _build(tmp_path, tiny_tokenizer, make_cfg, [uneven])


def test_pair_batches_keep_pairs_together(tiny_tokenizer, make_cfg):
    ds, val, stats = build_datasets(
        make_cfg(path="builtin:preference", format="preference", prompt_format="alpaca", val_size=0.1), tiny_tokenizer
    )
    assert stats.rows_train == len(ds) // 2 and stats.rows_val == len(val) // 2 == round(0.1 * stats.rows_used)
    assert set(ds.rows.tolist()).isdisjoint(val.rows.tolist())  # split by pair: no source row on both sides
    ds.ref_logps = np.arange(len(ds), dtype=np.float32)
    batcher = Batcher(ds, 3, tiny_tokenizer.pad_token_id, pairs=True, seed=5, num_shards=2, shard=1)
    assert len(batcher) == (len(ds) // 2 + 2) // 3 // 2
    for batch in [*batcher.epoch_batches(0)][:3]:
        rows = batch["rows"]
        assert batch["num_pairs"] == 3 and batch["input_ids"].shape[0] == 6
        assert (rows[:3] % 2 == 0).all() and (rows[3:] == rows[:3] + 1).all()  # chosen rows, then their rejected
        assert batch["ref_logps"].tolist() == rows.float().tolist()
        for r, row in enumerate(rows.tolist()):
            n = len(ds[row]["input_ids"])
            assert batch["input_ids"][r, :n].tolist() == ds[row]["input_ids"]
            assert batch["labels"][r, :n].tolist() == ds[row]["labels"] and (batch["labels"][r, n:] == -100).all()
    with pytest.raises(DataError, match="packed"):
        Batcher(ds, 3, 0, pairs=True, packing=True)
    with pytest.raises(DataError, match="rejected answers as well"):
        Batcher(val, 3, 0)  # pairs taken for SFT rows


def test_preview_shows_pairs(tiny_tokenizer, make_cfg, tmp_path):
    cfg = SimpleNamespace(
        model=SimpleNamespace(path="unused", trust_remote_code=False),
        lora=SimpleNamespace(train_untrained_tokens="auto"),
        data=make_cfg(path="builtin:preference", format="preference", prompt_format="dolly-ja", num_rows=6),
        output=SimpleNamespace(dir=str(tmp_path / "run")),
        train=SimpleNamespace(seed=42),
    )
    console = Console(record=True, width=100, color_system=None)
    stats = preview(cfg, n=2, console=console, tokenizer=tiny_tokenizer)
    text = console.export_text()
    assert text.count("pair ") == 2 and text.count("prompt:") == 2 and text.count("chosen (") == 2
    assert text.count("rejected (") == 2 and "### 回答:" in text and "format preference" in text
    assert stats.rows_read == 6 and "6 used" in text
    again = Console(record=True, width=100, color_system=None)
    assert preview(cfg, n=1, console=again, tokenizer=tiny_tokenizer).cache_hit

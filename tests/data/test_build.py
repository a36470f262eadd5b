"""build_datasets: validation split, cache, statistics, and the all-rows-unusable errors."""

from __future__ import annotations

import numpy as np
import pytest

from lorafuse.data import cache as cache_mod
from lorafuse.data.build import build_datasets
from lorafuse.data.readers import read_rows
from lorafuse.errors import DataError

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]


def test_demo_builds_with_stats_that_match_the_data(tiny_tokenizer, make_cfg):
    train, val, stats = build_datasets(make_cfg(path="builtin:demo"), tiny_tokenizer)
    assert val is None and stats.rows_read == len(train) == stats.rows_used == stats.rows_train
    all_labels = np.concatenate([np.asarray(train[i]["labels"]) for i in range(len(train))])
    assert stats.tokens_total == all_labels.size
    assert stats.target_tokens == int((all_labels != -100).sum())
    assert 0 < stats.masked_share < 1
    assert sum(c for _, _, c in stats.histogram) == len(train)
    assert stats.template == "plain" and not stats.cache_hit
    text = "\n".join(stats.summary())
    assert f"{len(read_rows('builtin:demo').rows)} read" in text and "masked" in text


def test_val_split_fraction_count_and_determinism(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    tr, va, st = build_datasets(make_cfg(path=path, val_size=0.1), tiny_tokenizer, seed=1)
    assert len(va) == 4 and len(tr) == 36 and st.rows_val == 4
    assert sorted(tr.rows.tolist() + va.rows.tolist()) == list(range(40))
    tr2, va2, _ = build_datasets(make_cfg(path=path, val_size=0.1), tiny_tokenizer, seed=1)
    assert va2.rows.tolist() == va.rows.tolist() and va2[0] == va[0]
    _, va3, _ = build_datasets(make_cfg(path=path, val_size=0.1), tiny_tokenizer, seed=2)
    assert va3.rows.tolist() != va.rows.tolist()
    _, va4, _ = build_datasets(make_cfg(path=path, val_size=7), tiny_tokenizer, seed=1)
    assert len(va4) == 7
    with pytest.raises(DataError, match="leaving none"):
        build_datasets(make_cfg(path=path, val_size=40), tiny_tokenizer)


def test_val_path(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    p = str(write_jsonl(tmp_path / "t.jsonl", ROWS[:30]))
    v = str(write_jsonl(tmp_path / "v.jsonl", ROWS[30:]))
    tr, va, st = build_datasets(make_cfg(path=p, val_path=v), tiny_tokenizer)
    assert len(tr) == 30 and len(va) == 10 and st.rows_read == 40
    assert va[0]["input_ids"] != tr[0]["input_ids"]


def test_second_build_is_a_cache_hit_with_identical_data(tiny_tokenizer, make_cfg, write_jsonl, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = make_cfg(path=str(path), val_size=0.1)
    tr1, va1, st1 = build_datasets(cfg, tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert not st1.cache_hit and st1.cache_path
    calls = []
    import lorafuse.data.build as build_mod

    real = build_mod.tokenize_samples
    monkeypatch.setattr(build_mod, "tokenize_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    tr2, va2, st2 = build_datasets(cfg, tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert st2.cache_hit and not calls
    assert [tr2[i] for i in range(len(tr2))] == [tr1[i] for i in range(len(tr1))]
    assert va2.rows.tolist() == va1.rows.tolist()
    assert st2.to_dict() | {"cache_hit": False} == st1.to_dict()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [st1.cache_path.split("/")[-1]]  # no temp files

    build_datasets(make_cfg(path=str(path), max_length=64), tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert len(calls) == 1  # a setting that changes tokens misses
    write_jsonl(path, ROWS[:-1])
    _, _, st3 = build_datasets(cfg, tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert not st3.cache_hit and len(calls) == 2  # changed content misses
    from lorafuse.model.tiny import build_tiny_tokenizer

    other = build_tiny_tokenizer(corpus=["a different corpus makes different merges"] * 3)
    _, _, st4 = build_datasets(cfg, other, cache_dir=tmp_path / "cache")
    assert not st4.cache_hit and len(calls) == 3  # another tokenizer misses


def test_corrupt_cache_file_is_rebuilt(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    cfg = make_cfg(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    _, _, st = build_datasets(cfg, tiny_tokenizer, cache_dir=tmp_path / "c")
    open(st.cache_path, "wb").write(b"garbage")
    tr, _, st2 = build_datasets(cfg, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert not st2.cache_hit and len(tr) == 40
    assert cache_mod.load(cache_mod.Path(st.cache_path)) is not None


def test_every_row_too_long_is_an_error(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": " word" * (12 + i)} for i in range(5)]
    shortest = min(len(tiny_tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows)
    assert shortest > 16  # precondition: every row is longer than max_length, though its prompt fits
    cfg = make_cfg(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), format="prompt-completion", max_length=16)
    with pytest.raises(DataError, match="every row .* longer than data.max_length=16") as e:
        build_datasets(cfg, tiny_tokenizer)
    assert f"at least {shortest}" in e.value.fix


def test_every_target_masked_is_an_error_with_the_longest_prompt(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    rows = [{"instruction": "x", "input": "", "output": "y"}] + [
        {"instruction": "a very long instruction " * 8, "input": "", "output": "y"} for _ in range(3)
    ]
    prompt_len = 1 + len(
        tiny_tokenizer("### Instruction:\n" + rows[1]["instruction"] + "\n\n### Response:\n", add_special_tokens=False)[
            "input_ids"
        ]
    )
    short_len = len(tiny_tokenizer("### Instruction:\nx\n\n### Response:\ny")["input_ids"]) + 1
    cfg = make_cfg(path=str(write_jsonl(tmp_path / "d.jsonl", rows[1:])), max_length=prompt_len - 1)
    with pytest.raises(DataError, match="every target is masked") as e:
        build_datasets(cfg, tiny_tokenizer)
    assert f"longest prompt is {prompt_len} tokens" in e.value.fix and "data.max_length" in e.value.fix
    # with one short row the run goes on, and the dropped rows are counted with where they are
    cfg = make_cfg(path=str(write_jsonl(tmp_path / "e.jsonl", rows)), max_length=max(short_len, prompt_len - 1))
    tr, _, st = build_datasets(cfg, tiny_tokenizer)
    assert len(tr) == 1 and st.rows_dropped == 3 and st.truncated == 3
    assert "line 2 of" in "\n".join(st.summary())


def test_template_auto_chat_for_messages_and_plain_without_chat_template(
    tiny_tokenizer, make_cfg, write_jsonl, tmp_path
):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    cfg = make_cfg(path=str(write_jsonl(tmp_path / "m.jsonl", rows)), format="messages")
    _, _, st = build_datasets(cfg, tiny_tokenizer)
    assert st.template == "chat"
    from lorafuse.model.tiny import build_tiny_tokenizer

    base = build_tiny_tokenizer()
    base.chat_template = None
    tr, _, st = build_datasets(cfg, base)
    assert st.template == "plain"
    assert "### Instruction:\nhi" in base.decode(tr[0]["input_ids"])


def test_unknown_format_in_build(tiny_tokenizer, loose_cfg):
    with pytest.raises(DataError, match="unknown data format 'alpacca'") as e:
        build_datasets(loose_cfg(format="alpacca"), tiny_tokenizer)
    assert "alpaca" in e.value.fix


def test_num_rows(tiny_tokenizer, make_cfg):
    tr, _, st = build_datasets(make_cfg(num_rows=10), tiny_tokenizer)
    assert len(tr) == 10 and st.rows_read == 10


def test_empty_answers_are_warned_and_counted(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    rows = [dict(r) for r in ROWS[:10]]
    rows[3]["output"] = rows[7]["output"] = ""
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, stats = build_datasets(make_cfg(path=str(path)), tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert len(train) == 10 and stats.empty_targets == 2
    assert [int((np.asarray(train[i]["labels"]) != -100).sum()) for i in (3, 7)] == [1, 1]  # the EOS alone
    warning = [line for line in stats.summary() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 rows have an empty answer" in warning[0] and "line 4 of" in warning[0]
    _, _, again = build_datasets(make_cfg(path=str(path)), tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert again.cache_hit and again.empty_targets == 2  # the count survives the cache


def test_only_empty_answers_are_refused(tiny_tokenizer, make_cfg, write_jsonl, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**r, "output": ""} for r in ROWS[:5]])
    with pytest.raises(DataError, match="no row of .* has an answer"):
        build_datasets(make_cfg(path=str(path)), tiny_tokenizer)
    train, _, stats = build_datasets(make_cfg(path=str(path), completion_only=False), tiny_tokenizer)
    assert len(train) == 5 and stats.empty_targets == 0  # the whole text trains: nothing to warn about

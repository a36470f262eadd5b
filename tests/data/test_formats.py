"""Row formats: exact plain templates, chat messages, field mapping, and row errors that say how to fix them."""

from __future__ import annotations

import pytest

from lorafuse.data.formats import format_rows, guess_format, plain_prompt
from lorafuse.data.readers import RowSource
from lorafuse.errors import DataError


def src(rows, lines=None):
    return RowSource(rows=rows, name="d.jsonl", fingerprint="x", line_numbers=lines)


def test_alpaca_plain_template_with_and_without_input():
    rows = [
        {"instruction": "Translate", "input": "猫", "output": "cat"},
        {"instruction": "Name a color.", "input": "", "output": "Red."},
    ]
    s = format_rows(src(rows), "alpaca", {}, "plain")
    assert s[0].chunks == [("### Instruction:\nTranslate\n\n### Input:\n猫\n\n### Response:\n", "cat")]
    assert s[1].chunks == [("### Instruction:\nName a color.\n\n### Response:\n", "Red.")]


def test_dolly_ja_template_is_the_seeds_exactly():
    row = {
        "instruction": "要約して",
        "input": "長い文章",
        "output": "短い文",
        "category": "summarization",
        "index": "7",
    }
    (s,) = format_rows(src([row]), "dolly-ja", {}, "plain")
    prompt, target = s.chunks[0]
    assert prompt + target == "### 指示:\n要約して\n\n### 入力:\n長い文章\n\n### 回答:\n短い文"
    (s,) = format_rows(src([{**row, "input": ""}]), "dolly-ja", {}, "plain")
    assert "".join(s.chunks[0]) == "### 指示:\n要約して\n\n### 回答:\n短い文"


def test_dolly_columns():
    row = {"instruction": "Who?", "context": "Ann met Bob.", "response": "Ann.", "category": "closed_qa"}
    (s,) = format_rows(src([row]), "dolly", {}, "plain")
    assert s.chunks == [("### Instruction:\nWho?\n\n### Input:\nAnn met Bob.\n\n### Response:\n", "Ann.")]


def test_system_prompt_plain_and_chat():
    row = {"instruction": "Hi", "output": "Hello"}
    (p,) = format_rows(src([row]), "alpaca", {}, "plain", system_prompt="Be brief.")
    assert p.chunks[0][0].startswith("Be brief.\n\n### Instruction:\nHi")
    (c,) = format_rows(src([row]), "alpaca", {}, "chat", system_prompt="Be brief.")
    assert c.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_alpaca_chat_joins_instruction_and_input():
    (c,) = format_rows(src([{"instruction": "Translate", "input": "猫", "output": "cat"}]), "alpaca", {}, "chat")
    assert c.messages == [{"role": "user", "content": "Translate\n\n猫"}, {"role": "assistant", "content": "cat"}]


def test_sharegpt_roles_and_plain_rendering():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
            {"from": "human", "value": "trailing"},
        ]
    }
    (c,) = format_rows(src([row]), "sharegpt", {}, "chat")
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    (p,) = format_rows(src([row]), "sharegpt", {}, "plain")
    assert p.chunks == [
        ("S\n\n### Instruction:\nQ1\n\n### Response:\n", "A1"),
        ("### Instruction:\nQ2\n\n### Response:\n", "A2"),
    ]


def test_messages_format_and_json_string_column():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    (c,) = format_rows(src([{"messages": msgs}]), "messages", {}, "chat")
    assert c.messages == msgs
    import json

    (c2,) = format_rows(src([{"messages": json.dumps(msgs)}]), "messages", {}, "chat")  # as a CSV would store it
    assert c2.messages == msgs


def test_prompt_completion_and_text():
    (p,) = format_rows(src([{"prompt": "Q: 1+1\nA:", "completion": " 2"}]), "prompt-completion", {}, "plain")
    assert p.chunks == [("Q: 1+1\nA:", " 2")]
    (t,) = format_rows(src([{"text": "plain words"}]), "text", {}, "plain")
    assert t.chunks == [("", "plain words")]
    with pytest.raises(DataError, match="template=plain"):
        format_rows(src([{"text": "x"}]), "text", {}, "chat")


def test_field_mapping_including_turn_keys():
    (s,) = format_rows(
        src([{"question": "Why?", "answer": "Because."}]),
        "alpaca",
        {"instruction": "question", "output": "answer"},
        "plain",
    )
    assert s.chunks == [("### Instruction:\nWhy?\n\n### Response:\n", "Because.")]
    row = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "hello"}]}
    (c,) = format_rows(src([row]), "sharegpt", {"conversations": "dialog", "from": "speaker", "value": "text"}, "chat")
    assert c.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_missing_field_names_row_fields_and_mapping():
    rows = [
        {"instruction": "a", "output": "b"},
        {"question": "Why?", "answer": "Because."},
        {"question": "How?", "answer": "So."},
    ]
    with pytest.raises(DataError) as e:
        format_rows(src(rows, lines=[1, 2, 4]), "alpaca", {}, "plain")
    msg = str(e.value)
    assert "line 2 of d.jsonl" in msg and "'question', 'answer'" in msg and "'instruction'" in msg
    assert "1 more rows" in msg
    assert "data.fields.instruction=question" in e.value.fix and "data.fields.output=answer" in e.value.fix


def test_missing_field_suggests_the_matching_format():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    with pytest.raises(DataError) as e:
        format_rows(src([row]), "alpaca", {}, "plain")
    assert "data.format=sharegpt" in e.value.fix
    assert guess_format({"instruction", "context", "response"}) == "dolly"
    assert guess_format({"prompt", "completion"}) == "prompt-completion"


def test_unknown_format_suggests_nearest():
    with pytest.raises(DataError, match="unknown data format") as e:
        format_rows(src([{"a": 1}]), "sharegtp", {}, "plain")
    assert "sharegpt" in e.value.fix


def test_unknown_field_mapping_key():
    with pytest.raises(DataError, match="does not use") as e:
        format_rows(src([{"instruction": "a", "output": "b"}]), "alpaca", {"question": "q"}, "plain")
    assert "instruction" in e.value.fix


def test_unknown_sharegpt_role_and_bad_turns():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]}
    with pytest.raises(DataError, match="turn 2 has the unknown role 'narrator'"):
        format_rows(src([row]), "sharegpt", {}, "chat")
    with pytest.raises(DataError, match="list of turn objects"):
        format_rows(src([{"conversations": "not a list"}]), "sharegpt", {}, "chat")
    with pytest.raises(DataError, match="no 'from' key") as e:
        format_rows(src([{"conversations": [{"role": "user", "content": "x"}]}]), "sharegpt", {}, "chat")
    assert "data.format=messages" in e.value.fix


def test_non_text_field_value():
    with pytest.raises(DataError, match="should be text"):
        format_rows(src([{"instruction": {"a": 1}, "output": "b"}]), "alpaca", {}, "plain")
    (s,) = format_rows(src([{"instruction": "2+2", "output": 4}]), "alpaca", {}, "plain")
    assert s.chunks[0][1] == "4"


def test_plain_prompt_matches_training_prompt():
    row = {"instruction": "要約して", "input": "文章", "output": "要約"}
    (s,) = format_rows(src([row]), "dolly-ja", {}, "plain", system_prompt="SYS")
    assert plain_prompt("dolly-ja", "要約して", "文章", "SYS") == s.chunks[0][0]

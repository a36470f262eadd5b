"""plain_chat_template: a conversation rendered with it tokenizes to the ids plain training built, for every plain
format, with and without input and system prompt; its generation prompt is the prompt training put before the
answer."""

from __future__ import annotations

import pytest

from lorafuse.data.formats import format_rows
from lorafuse.data.readers import RowSource
from lorafuse.data.templates import plain_chat_template, trained_chat_template
from lorafuse.data.tokenize import IGNORE, tokenize_samples

SYSTEM = "You answer briefly."

# (format, row, the same row as a conversation); a conversation's system message stands for the system prompt
CASES = [
    (
        "alpaca",
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."}],
    ),
    (
        "alpaca",
        {"instruction": "Translate.", "input": "猫が好きです。", "output": "I like cats."},
        [
            {"role": "user", "content": "Translate.", "input": "猫が好きです。"},
            {"role": "assistant", "content": "I like cats."},
        ],
    ),
    (
        "dolly",
        {"instruction": "Summarize.", "context": "The fox jumps.", "response": "A fox jumped."},
        [
            {"role": "user", "content": "Summarize.", "input": "The fox jumps."},
            {"role": "assistant", "content": "A fox jumped."},
        ],
    ),
    (
        "dolly",
        {"instruction": "Name a color.", "context": "", "response": "Blue."},
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    ),
    (
        "dolly-ja",
        {"instruction": "英語に翻訳してください。", "input": "今日は良い天気です。", "output": "The weather is nice."},
        [
            {"role": "user", "content": "英語に翻訳してください。", "input": "今日は良い天気です。"},
            {"role": "assistant", "content": "The weather is nice."},
        ],
    ),
    (
        "dolly-ja",
        {"instruction": "日本の首都は？", "input": "", "output": "東京です。"},
        [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}],
    ),
    (
        "prompt-completion",
        {"prompt": "The capital of Japan is", "completion": " Tokyo."},
        [{"role": "user", "content": "The capital of Japan is"}, {"role": "assistant", "content": " Tokyo."}],
    ),
    (
        "text",
        {"text": "The quick brown fox jumps over the lazy dog."},
        [{"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}],
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "Hi."},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Name a color."},
                {"from": "gpt", "value": "Red."},
            ]
        },
        [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Red."},
        ],
    ),
    (
        "messages",
        {
            "messages": [
                {"role": "user", "content": "2 + 2 ="},
                {"role": "assistant", "content": "4"},
                {"role": "tool", "content": "checked"},
                {"role": "user", "content": "and 3 + 3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
        [
            {"role": "user", "content": "2 + 2 ="},
            {"role": "assistant", "content": "4"},
            {"role": "tool", "content": "checked"},
            {"role": "user", "content": "and 3 + 3?"},
            {"role": "assistant", "content": "6"},
        ],
    ),
]


def _trained(tokenizer, fmt: str, row: dict, system_prompt: str | None):
    samples = format_rows(RowSource([row], "test", "x"), fmt, None, "plain", system_prompt)
    out = tokenize_samples(samples, tokenizer, "plain", max_length=10_000)
    return out.input_ids[0], out.labels[0]


def _render(tokenizer, template: str, messages: list[dict], generation: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("fmt,row,messages", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_conversation_renders_to_the_ids_training_built(tiny_tokenizer, fmt, row, messages, system):
    if system and fmt == "text":
        pytest.skip("format text has no prompt to put a system prompt in")
    ids, labels = _trained(tiny_tokenizer, fmt, row, system)
    conversation = ([{"role": "system", "content": system}] if system else []) + messages
    template = plain_chat_template(fmt, bos=True)
    assert _render(tiny_tokenizer, template, conversation) == ids
    if fmt == "text":
        return  # everything is trained: no prompt before the text
    # the generation prompt of the first turn is exactly what training put before the first answer
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE)
    upto = conversation[: conversation.index(next(m for m in conversation if m["role"] == "assistant"))]
    assert _render(tiny_tokenizer, template, upto, generation=True) == ids[:first]


def test_a_row_system_column_renders_like_a_system_message(tiny_tokenizer):
    row = {"instruction": "Name a color.", "input": "", "output": "Red.", "system": "Be terse."}
    ids, _ = _trained(tiny_tokenizer, "alpaca", row, SYSTEM)  # the row's own system prompt wins
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
    ]
    assert _render(tiny_tokenizer, plain_chat_template("alpaca", bos=True), conversation) == ids


def test_without_bos_the_template_writes_none(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi."}], chat_template=plain_chat_template("alpaca", bos=False), tokenize=False
    )
    assert text == "### Instruction:\nHi.\n\n"


def test_trained_template_of_a_chat_run_is_the_tokenizers(tiny_tokenizer):
    assert trained_chat_template("sharegpt", "chat", tiny_tokenizer) == tiny_tokenizer.chat_template
    plain = trained_chat_template("dolly-ja", "plain", tiny_tokenizer)
    assert plain == plain_chat_template("dolly-ja", bos=True)  # the tiny tokenizer puts <s> before text


def test_preference_pairs_raw_prompt_renders_as_training_wrote_it(tiny_tokenizer):
    template = trained_chat_template("preference", "plain", tiny_tokenizer, prompt_format="raw")
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q", "input": "context"}],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<s>Q\n\ncontext"

"""The chat template a run trained on, as Jinja, so generation, chat, merged models and GGUF files prompt the model
the way training did.

A chat-template run trained on the tokenizer's own `chat_template`: that is the template. A plain-template run
(alpaca, dolly, dolly-ja, prompt-completion, text, and sharegpt/messages with data.template=plain) rendered text
with `lorafuse.data.formats`; `plain_chat_template(fmt, bos)` is the Jinja template that renders a conversation to
the same text, turn for turn:

    system      content + "\\n\\n"
    user        "### Instruction:\\n" + content + "\\n\\n" [+ "### Input:\\n" + message.input + "\\n\\n"]
    assistant   "### Response:\\n" + content + EOS            (the generation prompt is "### Response:\\n")
    tool        "### Tool:\\n" + content + "\\n\\n"
with the format's headers (dolly-ja: 指示 / 入力 / 回答), and BOS first when the tokenizer puts BOS before text. A
user message may carry an `input` key: the Input block of alpaca-like rows (a chat-template run folded it into the
user message, after a blank line). prompt-completion and text have no headers: user content as written (an input
after a blank line, as preference pairs with data.prompt_format=raw write it), the reply right after it.
Tokenized, the rendering gives the ids training built (the EOS after each reply is the EOS token);
tests/data/test_templates.py checks that for every plain format, with and without input and system prompt.
"""

from __future__ import annotations

import json

from lorafuse.data.formats import _HEADERS, _SPECS, check_format


def _lit(text: str) -> str:
    """A Jinja string literal (JSON's quoting: Jinja reads its escapes the same way)."""
    return json.dumps(text, ensure_ascii=False)


def plain_chat_template(fmt: str, bos: bool) -> str:
    """The Jinja chat template equivalent to the plain rendering of format `fmt` (module docstring)."""
    check_format(fmt)
    heads = _SPECS[fmt][2]
    if heads is None:  # prompt-completion, text: the text as written
        user = (
            "{{ message['content'] }}"
            "{% if message['input'] is defined and message['input'] %}"
            "{{ " + _lit("\n\n") + " + message['input'] }}"
            "{% endif %}"
        )
        gen, tool = "", "{{ message['content'] + " + _lit("\n\n") + " }}"
    else:
        instruction, inp, response = _HEADERS[heads]
        user = (
            "{{ " + _lit(instruction + "\n") + " + message['content'] + " + _lit("\n\n") + " }}"
            "{% if message['input'] is defined and message['input'] %}"
            "{{ " + _lit(inp + "\n") + " + message['input'] + " + _lit("\n\n") + " }}"
            "{% endif %}"
        )
        gen = response + "\n"
        tool = "{{ " + _lit("### Tool:\n") + " + message['content'] + " + _lit("\n\n") + " }}"
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}{{ message['content'] + "
        + _lit("\n\n")
        + " }}"
        + "{% elif message['role'] == 'user' %}"
        + user
        + "{% elif message['role'] == 'assistant' %}{{ "
        + (_lit(gen) + " + " if gen else "")
        + "message['content'] + eos_token }}"
        + "{% else %}"
        + tool
        + "{% endif %}"
        + "{% endfor %}"
        + ("{% if add_generation_prompt %}{{ " + _lit(gen) + " }}{% endif %}" if gen else "")
    )


def trained_chat_template(fmt: str, kind: str, tokenizer, prompt_format: str = "alpaca") -> str | None:
    """The Jinja of what a run trained on: data.format `fmt`, the template `kind` it resolved to ("plain" or "chat",
    DataStats.template), preference pairs' data.prompt_format; None for a chat run whose tokenizer has none."""
    from lorafuse.data.tokenize import bos_prefix

    if kind == "chat":
        return getattr(tokenizer, "chat_template", None)
    if fmt == "preference":  # the prompt as data.prompt_format writes it; raw is prompt-completion's text
        fmt = "prompt-completion" if prompt_format == "raw" else prompt_format
    bos = bos_prefix(tokenizer)
    return plain_chat_template(fmt, bool(bos) and bos == [tokenizer.bos_token_id])

"""Row formats: turn one data row into what the tokenizer step trains on.

A row becomes a `Sample` in one of two shapes, picked by the template (`data.template`):

  * plain: `chunks = [(prompt, target), ...]`. The text is prompt+target+prompt+target...; only targets are
    trained (with `data.completion_only`), and an EOS token follows every target. Templates:
        alpaca / dolly      "### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n" + output
        dolly-ja            "### 指示:\\n{instruction}\\n\\n### 入力:\\n{input}\\n\\n### 回答:\\n" + output
                            (the Input block is left out when the input is empty)
        prompt-completion   prompt + completion, joined as written (the file controls the separator)
        text                "" + text (everything trained)
        sharegpt / messages one alpaca-style chunk per user turn, with its assistant reply as the target
  * chat: `messages = [{"role", "content"}, ...]` for the tokenizer's chat template; assistant turns are trained.
    alpaca-like rows become [system?, user: instruction (+ "\\n\\n" + input), assistant: output].

`data.system_prompt` is prepended (plain: as text + "\\n\\n"; chat: as a system message) unless the row has one
(a `system` column for alpaca/dolly/dolly-ja/sharegpt/prompt-completion rows, or a system turn).
`data.fields` maps our field names to the file's columns: {"instruction": "question", "output": "answer"}; inside
conversations, `from`/`value` (sharegpt) and `role`/`content` (messages) can be mapped the same way.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from lorafuse.data.readers import RowSource
from lorafuse.errors import DataError

_HEADERS = {
    "alpaca": ("### Instruction:", "### Input:", "### Response:"),
    "dolly-ja": ("### 指示:", "### 入力:", "### 回答:"),
}
# format -> (required fields, optional fields, header set for the plain template)
_SPECS = {
    "alpaca": (("instruction", "output"), ("input", "system"), "alpaca"),
    "dolly": (("instruction", "response"), ("context", "system"), "alpaca"),
    "dolly-ja": (("instruction", "output"), ("input", "system"), "dolly-ja"),
    "sharegpt": (("conversations",), ("from", "value", "system"), "alpaca"),
    "messages": (("messages",), ("role", "content"), "alpaca"),
    "prompt-completion": (("prompt", "completion"), ("system",), None),
    "text": (("text",), (), None),
}
FORMAT_NAMES = (*_SPECS, "preference")  # preference pairs: lorafuse.data.preference
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    """One row ready to tokenize: `chunks` (plain template) or `messages` (chat template)."""

    chunks: list[tuple[str, str]] | None = None
    messages: list[dict] | None = None


def check_format(fmt: str) -> None:
    if fmt not in _SPECS:
        near = difflib.get_close_matches(str(fmt), FORMAT_NAMES, n=1)
        raise DataError(
            f"unknown data format '{fmt}'.",
            f"set data.format to one of {', '.join(FORMAT_NAMES)}"
            + (f" (did you mean '{near[0]}'?)" if near else "")
            + ".",
        )


def default_template(fmt: str) -> str:
    """What template="auto" means: the chat template for conversations, the plain text template otherwise."""
    return "chat" if fmt in ("sharegpt", "messages") else "plain"


def plain_prompt(fmt: str, instruction: str, input: str = "", system_prompt: str | None = None) -> str:
    """The plain-template prompt a model trained on `fmt` expects at inference (generation starts after it)."""
    check_format(fmt)
    heads = _HEADERS[_SPECS[fmt][2] or "alpaca"]
    text = f"{heads[0]}\n{instruction}\n\n"
    if input:
        text += f"{heads[1]}\n{input}\n\n"
    text += f"{heads[2]}\n"
    return (system_prompt + "\n\n" + text) if system_prompt else text


def format_rows(
    src: RowSource, fmt: str, fields: dict | None, template: str, system_prompt: str | None = None
) -> list[Sample]:
    """Samples for every row of `src`; DataError naming the row and its fields when one does not fit `fmt`."""
    check_format(fmt)
    required, optional, _ = _SPECS[fmt]
    cols = {**{k: k for k in required + optional}, **(fields or {})}
    unknown = sorted(set(fields or {}) - set(required + optional))
    if unknown:
        raise DataError(
            f"data.fields names {unknown}, which format '{fmt}' does not use.",
            f"format '{fmt}' reads the fields {list(required + optional)}; map those "
            f"(e.g. data.fields.{required[0]}=your_column).",
        )
    _check_required(src, fmt, required, cols)
    if template == "chat" and fmt == "text":
        raise DataError(
            "data.template=chat needs turns, but format 'text' has only plain text.",
            "set data.template=plain (or auto) for format 'text'.",
        )
    build = _chat_sample if template == "chat" else _plain_sample
    return [build(fmt, row, cols, system_prompt, lambda i=i: src.where(i)) for i, row in enumerate(src.rows)]


def _check_required(src: RowSource, fmt: str, required: tuple, cols: dict) -> None:
    bad = [i for i, row in enumerate(src.rows) if any(row.get(cols[f]) is None for f in required)]
    if not bad:
        return
    row = src.rows[bad[0]]
    missing = [f for f in required if row.get(cols[f]) is None]
    have = [k for k in row if row[k] is not None]
    unused = [k for k in have if k not in cols.values()]
    example = ", ".join(f"data.fields.{m}={c}" for m, c in _suggest_columns(missing, unused).items())
    guess = guess_format(have)
    more = f" ({len(bad) - 1} more rows have the same problem)" if len(bad) > 1 else ""
    raise DataError(
        f"{src.where(bad[0])} has no {', '.join(repr(cols[m]) for m in missing)} field needed by data format "
        f"'{fmt}'{more}; the row has the fields {have}.",
        f"map your columns with data.fields, e.g. {example}"
        + (f"; or this looks like format '{guess}': data.format={guess}" if guess and guess != fmt else "")
        + ".",
    )


_SYNONYMS = {
    "instruction": ("question", "query", "prompt", "instruction_ja", "task"),
    "output": ("answer", "response", "completion", "target", "output_ja"),
    "response": ("answer", "output", "completion", "target"),
    "input": ("context", "question_context", "input_ja"),
    "context": ("input", "passage"),
    "prompt": ("question", "instruction", "query", "input"),
    "completion": ("answer", "response", "output", "target"),
    "text": ("content", "body", "document"),
    "conversations": ("conversation", "messages", "dialog", "turns"),
    "messages": ("conversation", "conversations", "dialog", "turns"),
}


def _suggest_columns(missing: list[str], unused: list[str]) -> dict[str, str]:
    """A plausible file column for each missing field: a known synonym, else the closest name, each used once."""
    free, out = list(unused), {}
    for m in missing:
        pick = next((c for c in free if c.lower() in _SYNONYMS.get(m, ())), None)
        pick = pick or next(iter(difflib.get_close_matches(m, free, 1, 0.0)), None)
        out[m] = pick or "<column>"
        if pick:
            free.remove(pick)
    return out


def guess_format(keys) -> str | None:
    """The format whose required fields a row with these keys has, if any."""
    keys = set(keys)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    for fmt in ("sharegpt", "messages", "dolly", "prompt-completion", "alpaca", "text"):
        if set(_SPECS[fmt][0]) <= keys:
            return fmt
    return None


def _text(row: dict, col: str, where) -> str:
    return text_value(row.get(col), where, col)


def text_value(value, where, col: str) -> str:
    """A text field's value as a string (None: ""; numbers and booleans as written), or the DataError that names the
    row (`where()`) and the column when it holds a list, a dict or anything else."""
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    raise DataError(
        f"{where()}: field '{col}' should be text but is a {type(value).__name__}: {str(value)[:60]!r}",
        "store plain strings in that column, or map another column with data.fields.",
    )


def _single_turn(fmt: str, row: dict, cols: dict, where) -> tuple[str, str, str, str]:
    """(system, instruction, input, output) of an alpaca-like or prompt-completion row."""
    if fmt == "prompt-completion":
        return (
            _text(row, cols["system"], where),
            _text(row, cols["prompt"], where),
            "",
            _text(row, cols["completion"], where),
        )
    inp, out = ("context", "response") if fmt == "dolly" else ("input", "output")
    return (
        _text(row, cols["system"], where),
        _text(row, cols["instruction"], where),
        _text(row, cols[inp], where),
        _text(row, cols[out], where),
    )


def _plain_sample(fmt, row, cols, system_prompt, where) -> Sample:
    if fmt == "text":
        return Sample(chunks=[("", _text(row, cols["text"], where))])
    if fmt in ("sharegpt", "messages"):
        return Sample(chunks=_plain_turns(_turns(fmt, row, cols, where), system_prompt))
    system, instruction, inp, output = _single_turn(fmt, row, cols, where)
    system = system or system_prompt
    if fmt == "prompt-completion":
        return Sample(chunks=[((system + "\n\n" if system else "") + instruction, output)])
    return Sample(chunks=[(plain_prompt(fmt, instruction, inp, system), output)])


def _plain_turns(messages: list[dict], system_prompt: str | None) -> list[tuple[str, str]]:
    """alpaca-style rendering of a conversation: each assistant reply is the target of the text before it."""
    heads = _HEADERS["alpaca"]
    chunks, pending = [], ""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        pending = system_prompt + "\n\n"
    for m in messages:
        if m["role"] == "assistant":
            chunks.append((pending, m["content"]))
            pending = ""
        elif m["role"] == "user":
            pending += f"{heads[0]}\n{m['content']}\n\n{heads[2]}\n"
        elif m["role"] == "system":
            pending += m["content"] + "\n\n"
        else:
            pending += f"### Tool:\n{m['content']}\n\n"
    return chunks  # text after the last assistant reply trains nothing, so it is left out


def _chat_sample(fmt, row, cols, system_prompt, where) -> Sample:
    if fmt in ("sharegpt", "messages"):
        messages = _turns(fmt, row, cols, where)
    else:
        system, instruction, inp, output = _single_turn(fmt, row, cols, where)
        messages = [
            {"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")},
            {"role": "assistant", "content": output},
        ]
        if system:
            messages.insert(0, {"role": "system", "content": system})
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Sample(messages=messages)


def _turns(fmt: str, row: dict, cols: dict, where) -> list[dict]:
    """The conversation of a sharegpt/messages row as [{"role", "content"}], roles checked."""
    key = cols["conversations" if fmt == "sharegpt" else "messages"]
    turns = row[key]
    if isinstance(turns, str):  # CSV and some exports store the list as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            pass
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(
            f"{where()}: field '{key}' should be a list of turn objects, got {str(turns)[:80]!r}",
            'store each conversation as a JSON list of {"from": ..., "value": ...} (sharegpt) or '
            '{"role": ..., "content": ...} (messages) objects.',
        )
    role_key, text_key = (cols["from"], cols["value"]) if fmt == "sharegpt" else (cols["role"], cols["content"])
    names = _SHAREGPT_ROLES if fmt == "sharegpt" else {r: r for r in _ROLES}
    messages = []
    for n, t in enumerate(turns, start=1):
        if role_key not in t:
            raise DataError(
                f"{where()}: turn {n} has no '{role_key}' key; it has {list(t)}.",
                f"map the key with data.fields.{'from' if fmt == 'sharegpt' else 'role'}=<key>, or "
                f"use data.format={'messages' if fmt == 'sharegpt' else 'sharegpt'} if that matches.",
            )
        role = names.get(str(t[role_key]).lower())
        if role is None:
            raise DataError(
                f"{where()}: turn {n} has the unknown role '{t[role_key]}'.",
                f"use one of {sorted(names)} for '{role_key}', or fix the data.",
            )
        content = t.get(text_key)
        messages.append({"role": role, "content": "" if content is None else _text(t, text_key, where)})
    system = _text(row, cols["system"], where) if "system" in cols else ""
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages

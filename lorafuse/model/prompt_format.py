"""How a model was trained to be prompted, read from its adapter (or merged) folder and carried on the model.

lorafuse.json, which lorafuse writes into every adapter folder and merged model folder, holds beside the base's
facts (CONTRACTS.md, "adapter knows how it was trained"):

    format          data.format of the run ("dolly-ja", "sharegpt", ...)
    template        "plain" or "chat"
    chat_template   Jinja that renders a conversation as training rendered it (lorafuse.data.templates)
    system_prompt   data.system_prompt: put in as a system message when a conversation has none; or null
    eos_token       the token every trained answer ends with

`PromptFormat` is that record. `model_state(model).prompt` carries it once the train job, `load_adapter` or
`load_model` (for a merged folder) knows it; generate and chat render prompts with it. `read_prompt_format(folder)`
reads it: lorafuse.json when it has a chat template (source "lorafuse.json"); else, for a folder another tool wrote
(a peft adapter saved with its tokenizer), the folder's own tokenizer chat template (source "tokenizer"); else None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import ModelError
from lorafuse.io_errors import reading

FACTS_NAME = "lorafuse.json"
PROMPT_KEYS = ("format", "template", "chat_template", "system_prompt", "eos_token")


@dataclass(frozen=True)
class PromptFormat:
    chat_template: str | None
    system_prompt: str | None = None
    eos_token: str | None = None
    format: str | None = None
    template: str | None = None  # "plain" | "chat"
    source: str = FACTS_NAME  # or "tokenizer": a folder lorafuse did not write

    def facts(self) -> dict:
        """The lorafuse.json keys of this record."""
        return {k: getattr(self, k) for k in PROMPT_KEYS}


def read_facts(folder) -> dict | None:
    """lorafuse.json of `folder` as a dict, or None when there is none (ModelError naming it when it is corrupt)."""
    path = Path(folder).expanduser() / FACTS_NAME
    if not path.is_file():
        return None
    with reading(path, "the adapter's training facts", ModelError, fix="save the adapter again, or delete that file"):
        facts = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(facts, dict):
        raise ModelError(f"{path} holds a JSON {type(facts).__name__}, not an object", "delete that file")
    return facts


def read_prompt_format(folder, tokenizer_fallback: bool = True) -> PromptFormat | None:
    """The prompt format recorded in `folder` (module docstring), or None; lorafuse.json's only when
    `tokenizer_fallback` is False (a model folder, whose own tokenizer already has its template)."""
    facts = read_facts(folder) if Path(folder).expanduser().is_dir() else None
    if isinstance((facts or {}).get("chat_template"), str):
        return PromptFormat(**{k: facts.get(k) for k in PROMPT_KEYS})
    if not tokenizer_fallback:
        return None
    template = tokenizer_chat_template(folder)
    return PromptFormat(template, source="tokenizer") if template else None


def tokenizer_chat_template(folder) -> str | None:
    """The chat template saved with a tokenizer in `folder` (chat_template.jinja, or tokenizer_config.json's key:
    a string, or the entry named "default" of a list of named templates)."""
    folder = Path(folder).expanduser()
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    with reading(config, "the tokenizer file", ModelError, fix="copy that file from the base model again"):
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None

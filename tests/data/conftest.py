"""Fixtures for the data tests: a DataConfig factory and tokenizers with awkward special-token setups."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lorafuse.config import DataConfig

# DataConfig's fields and defaults with the built-in demo data: make_cfg validates overrides, loose_cfg passes
# values the pydantic model would reject before they reach the data code (e.g. an unknown format).
DATA_DEFAULTS = DataConfig(path="builtin:demo").model_dump()


def _make_data_cfg(**overrides):
    return DataConfig(**{**DATA_DEFAULTS, **overrides})


def _loose_data_cfg(**overrides):
    """Always a plain namespace (no validation), for values only the data code itself should reject."""
    return SimpleNamespace(**{**DATA_DEFAULTS, **overrides})


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def make_cfg():
    """make_cfg(**fields) -> a DataConfig."""
    return _make_data_cfg


@pytest.fixture
def loose_cfg():
    """loose_cfg(**fields) -> an unvalidated namespace with DataConfig's fields."""
    return _loose_data_cfg


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) -> path, UTF-8 JSON Lines."""
    return _write_jsonl


@pytest.fixture(scope="session")
def pad_eos_tokenizer():
    """The tiny tokenizer with PAD set to EOS, the seed recipe's `tokenizer.pad_token = tokenizer.eos_token`."""
    from lorafuse.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


@pytest.fixture(scope="session")
def untagged_tokenizer():
    """The tiny tokenizer with its chat template minus the {% generation %} tags (the prefix-method path)."""
    from lorafuse.model.tiny import CHAT_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" not in tok.chat_template
    return tok


@pytest.fixture(scope="session")
def no_eos_template_tokenizer():
    """A chat template whose assistant turn ends with <|im_end|> but no EOS (Qwen-base-like)."""
    from lorafuse.model.tiny import CHAT_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("'<|im_end|>' + eos_token", "'<|im_end|>'")
    assert "eos_token }}{% endgeneration" not in tok.chat_template
    return tok

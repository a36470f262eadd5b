"""Checks of a model source before its weights are read, so each fault is named instead of surfacing as the
first exception transformers raises.

* `check_config_json(folder)`, `check_tokenizer_files(folder)`: config.json and the tokenizer's JSON files parse
  (a corrupt one is named with its JSON error, not reported as "no usable tokenizer").
* `check_attn_implementation(name)`: one of the attention backends transformers knows (or a hub kernel).
* `model_code_errors(folder, attn)`: transformers' ValueError/ImportError for a model that needs its own code
  (trust_remote_code) or an attention backend that is not installed, as a ModelError with the fix.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lorafuse.errors import ModelError
from lorafuse.io_errors import reading


def check_config_json(folder: Path) -> dict:
    """The parsed config.json of a model folder (ModelError naming the file when it does not parse)."""
    path = folder / "config.json"
    with reading(path, "the model config", ModelError, fix="download the model again, or repair that file"):
        config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ModelError(
            f"the model config {path} holds a JSON {type(config).__name__}, not an object",
            "download the model again, or repair that file",
        )
    return config


def check_tokenizer_files(folder) -> None:
    """The tokenizer's JSON files of a local folder parse (a corrupt one is named, with its JSON error)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = Path(folder) / name
        if path.is_file():
            with reading(path, "the tokenizer file", ModelError, fix="copy that file from the base model again"):
                json.loads(path.read_text(encoding="utf-8"))


def check_attn_implementation(name: str | None) -> None:
    if name is None or "/" in name:  # None: transformers' default; "org/repo": a kernel from the hub
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known:
        raise ModelError(
            f"model.attn_implementation={name!r} is not an attention backend transformers knows",
            f"use one of {', '.join(known)}, or null for transformers' default",
        )


def check_remote_code(folder, trust_remote_code: bool) -> None:
    """A local model whose config.json maps to code of its own (auto_map, for a model type transformers does not
    ship) needs model.trust_remote_code; say so before anything else is loaded."""
    if trust_remote_code or not Path(folder).is_dir():
        return
    config = check_config_json(Path(folder))
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise remote_code_error(folder)


def remote_code_error(folder) -> ModelError:
    return ModelError(
        f"the model in {folder} needs its own Python code (config.json auto_map), and lorafuse does not run a "
        "model's code unless allowed",
        "read that code first; if you trust it, set model.trust_remote_code=true",
    )


@contextlib.contextmanager
def model_code_errors(folder, attn_implementation: str | None):
    """transformers' errors for remote code and attention backends as ModelErrors (see the module docstring)."""
    try:
        yield
    except (ValueError, ImportError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise remote_code_error(folder) from exc
        if attn_implementation and ("attn_implementation" in text or "ttention" in text):
            raise ModelError(
                f"model.attn_implementation={attn_implementation!r} cannot be used here: {text.splitlines()[0]}",
                "install what it needs, or set model.attn_implementation to sdpa, eager or null",
            ) from exc
        raise

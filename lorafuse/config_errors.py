"""Turning pydantic's ValidationError into one readable ConfigError, and suggesting the key meant.

pydantic reports each problem as (loc, type, input, ctx). We render every one as a line that names the
dotted key, the value given and what is allowed, e.g.

    - lora.dropout = 1.5: allowed >= 0 and < 1
    - unknown key 'lora.rank'; did you mean 'lora.r'?

Suggestions come first from `ALIASES` (the names HF TrainingArguments, peft, bitsandbytes, TRL and other
tools use for the same setting, since users bring configs from those), then from string similarity
(difflib) among the keys of the same section, then from a key of that name in another section.
"""

from __future__ import annotations

import difflib
import json
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError

from lorafuse.errors import ConfigError

ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "scale": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "lora_target_modules": "lora.targets",
    "target": "lora.targets",
    "lora_target": "lora.targets",
    "modules": "lora.targets",
    "use_rslora": "lora.rslora",
    "use_dora": "lora.dora",
    "init_lora_weights": "lora.init",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "epoch": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_accumulation": "train.grad_accum",
    "accumulation_steps": "train.grad_accum",
    "grad_accumulation": "train.grad_accum",
    "optim": "train.optimizer",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "warmup_ratio": "train.warmup_steps",
    "warmup": "train.warmup_steps",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sequence_len": "data.max_length",
    "seq_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "max_len": "data.max_length",
    "dataset": "data.path",
    "dataset_name": "data.path",
    "data_path": "data.path",
    "train_file": "data.path",
    "val_set_size": "data.val_size",
    "eval_size": "data.val_size",
    "validation_split": "data.val_size",
    "test_size": "data.val_size",
    "val_split": "data.val_size",
    "output_dir": "output.dir",
    "model_name_or_path": "model.path",
    "base_model": "model.path",
    "model_name": "model.path",
    "model_id": "model.path",
    "name": "model.path",
    "load_in_4bit": "model.quant",
    "quantization": "model.quant",
    "bnb_4bit_quant_type": "model.quant",
    "bnb_4bit_compute_dtype": "model.compute_dtype",
    "torch_dtype": "model.compute_dtype",
    "dtype": "model.compute_dtype",
    "bf16": "model.compute_dtype",
    "fp16": "model.compute_dtype",
    "bnb_4bit_use_double_quant": "model.double_quant",
    "bnb_4bit_blocksize": "model.blocksize",
}


def _all_leaf_paths(root: type[BaseModel]) -> list[str]:
    return [f"{s}.{k}" for s, f in root.model_fields.items() for k in f.annotation.model_fields]


def suggest_key(section_model: type[BaseModel], prefix: str, key: str, root: type[BaseModel]) -> str | None:
    """The dotted key most likely meant by `key` (unknown in `section_model`, found under `prefix` of `root`)."""
    norm = key.strip().lower().replace("-", "_")
    if norm in ALIASES:
        return ALIASES[norm]
    leaves = _all_leaf_paths(root)
    same_name = [p for p in leaves if p.rsplit(".", 1)[1] == norm]
    if same_name:  # the right name in the wrong section (`lora: {lr: ...}`)
        return same_name[0]
    siblings = list(section_model.model_fields)
    close = difflib.get_close_matches(norm, siblings, n=1, cutoff=0.6)
    if close:
        return f"{prefix}.{close[0]}" if prefix else close[0]
    close = difflib.get_close_matches(norm, [p.rsplit(".", 1)[1] for p in leaves], n=1, cutoff=0.75)
    return next((p for p in leaves if close and p.endswith("." + close[0])), None)


def _unknown_key_line(section_model: type[BaseModel], prefix: str, key: str, root) -> tuple[str, str | None]:
    """("unknown key 'lora.rank' in section 'lora'; did you mean 'lora.r'?", "lora.r")."""
    where = f"in section '{prefix}'" if prefix else "at the top level"
    dotted = f"{prefix}.{key}" if prefix else key
    line = f"unknown key '{dotted}' {where}"
    guess = suggest_key(section_model, prefix, str(key), root)
    if guess:
        return f"{line}; did you mean '{guess}'?", guess
    return f"{line}; valid keys: {', '.join(section_model.model_fields)}", None


def check_key_path(key: str, origin: str, root: type[BaseModel]) -> None:
    """Raise ConfigError if dotted `key` names no field of the config model `root` (mappings such as data.fields
    accept any sub-key)."""
    model: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            if typing.get_origin(model) is dict:
                return
            raise ConfigError(
                f"{origin}: '{prefix}' is a value, not a section, so '{key}' does not exist",
                f"set '{prefix}' itself, e.g. {prefix}=...",
            )
        if part not in model.model_fields:
            line, guess = _unknown_key_line(model, prefix, part, root)
            raise ConfigError(
                f"{origin}: {line}",
                f"write {guess}=..."
                if guess
                else "use a key from the config reference (docs/config.md), e.g. lora.r=32",
            )
        model = model.model_fields[part].annotation


def _walk(loc: tuple, root: type[BaseModel]) -> tuple[str, Any, type[BaseModel] | None, Any]:
    """(dotted path, FieldInfo of the last field reached, the model holding it, last unmatched part)."""
    model: Any = root
    parts: list[str] = []
    info = None
    for item in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            if item not in model.model_fields:
                return ".".join(parts), info, model, item
            info = model.model_fields[item]
            parts.append(str(item))
            model = info.annotation if isinstance(info.annotation, type) else None
        elif isinstance(item, int):
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))  # a key inside a mapping such as data.fields
    return ".".join(parts), info, None, None


def _allowed_range(info) -> str:
    bounds = []
    for meta in getattr(info, "metadata", []):
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {getattr(meta, attr)}")
    return " and ".join(bounds)


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a text string",
    "list": "a list, e.g. [a, b]",
    "dict": "a mapping",
    "model": "a section (a mapping of keys)",
}


def _problem_line(err: dict, root: type[BaseModel]) -> str:
    path, info, parent, unknown = _walk(err["loc"], root)
    kind, given, msg = err["type"], err.get("input"), err["msg"]
    if kind == "extra_forbidden" and parent is not None:
        return _unknown_key_line(parent, path, unknown, root)[0]
    if kind == "missing":
        section = path.rpartition(".")[0]
        if section and given == {}:  # `data:` with nothing under it reads as null, then as an empty section
            leaf = path.rpartition(".")[2]
            return f"'{path}' is required, but the section '{section}' is empty (null); write `{leaf}: ...` under it"
        return f"'{path}' is required but missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    section_level = info is None or (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
    if kind == "value_error" and section_level:
        return msg  # a cross-key check: its message names the keys itself
    label = f"{path} = {json.dumps(given, ensure_ascii=False, default=str)}"
    if kind == "finite_number":
        return f"{label}: must be a finite number (not inf or NaN)"
    if given is None:
        for stem, words in _TYPE_WORDS.items():
            if kind.startswith(stem + "_") or kind == f"{stem}_type":
                default = "" if info is None or info.is_required() else "; leave the key out for the default"
                return f"{path} is null (empty); it must be {words}{default}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{label}: out of range; allowed {_allowed_range(info) or msg}"
    if kind == "literal_error":
        options = err.get("ctx", {}).get("expected", "")
        choices = [o.strip(" '") for o in options.replace(" or ", ",").split(",")]
        close = difflib.get_close_matches(str(given), choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{label}: allowed values are {options}{hint}"
    for stem, words in _TYPE_WORDS.items():
        if kind.startswith(stem + "_") or kind == f"{stem}_type":
            return f"{label}: must be {words}"
    return f"{label}: {msg}"


def validation_error_to_config_error(
    exc: ValidationError, source: str, from_cli: set[str], root: type[BaseModel]
) -> ConfigError:
    """One ConfigError listing every problem of validating `root` (the config model) once, each marked when it came
    from a command-line override."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        line = _problem_line(err, root)
        full = ".".join(str(p) for p in err["loc"])
        if any(full == k or full.startswith(k + ".") for k in from_cli):
            line += " (set on the command line)"
        if line not in lines:
            lines.append(line)
    if len(lines) == 1:
        problem = f"invalid config ({source}): {lines[0]}"
    else:
        problem = f"invalid config ({source}), {len(lines)} problems:\n" + "\n".join(f"  - {x}" for x in lines)
    fix = (
        "correct the key(s) above; every key, its type, default and allowed values are in the config reference, "
        "docs/config.md"
    )
    error = ConfigError(problem, fix)
    error.problems = lines
    return error

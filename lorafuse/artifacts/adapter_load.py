"""Load a LoRA adapter in peft's format (ours or one peft saved) onto a model from `load_model`.

`load_adapter` reads adapter_config.json, applies LoRA with the same targets and settings (peft's target semantics:
a string is a regex over full names, a list matches names or name suffixes, "all-linear" was expanded to full paths on
save), then loads every tensor strictly: a missing or unexpected key, or a shape that does not fit (an adapter made
for another base) is a ModelError that says what was expected. Each tensor is cast to the dtype of its parameter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lorafuse.artifacts.adapter_io import (
    _PEFT_DEFAULTS,
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _base_name,
    _matches_list,
    _under_modules_to_save,
    lora_layers,
    resolve_modules_to_save,
)
from lorafuse.errors import ModelError
from lorafuse.io_errors import reading
from lorafuse.lora import token_rows
from lorafuse.model.prompt_format import read_facts, read_prompt_format
from lorafuse.model_state import model_state

# Config values that change the function in ways lorafuse does not implement: key -> value(s) we accept.
_UNSUPPORTED = {
    "bias": ("none",),
    "lora_bias": (False,),
    "fan_in_fan_out": (False,),
    "use_qalora": (False,),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_bdlora": (None, False),
}


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json (ours or peft's) with peft's defaults filled in for absent keys; checked for LoRA."""
    folder = Path(adapter_dir).expanduser()
    if folder.is_file():
        raise ModelError(
            f"the adapter path {folder} is a file, not an adapter folder",
            "pass the folder that holds adapter_config.json and adapter_model.safetensors",
        )
    if not folder.is_dir():
        raise ModelError(
            f"adapter folder not found: {folder}", "pass the folder that save_adapter (or peft's save_pretrained) wrote"
        )
    path = folder / CONFIG_NAME
    if not path.is_file():
        hint = (
            "it holds config.json, so it looks like a full (merged) model: load it with load_model instead"
            if (folder / "config.json").is_file()
            else "pass the folder that holds adapter_config.json and adapter_model.safetensors"
        )
        raise ModelError(f"{folder} has no {CONFIG_NAME}, so it is not a LoRA adapter folder", hint)
    with reading(path, "the adapter config", ModelError, fix="save the adapter again, or repair that file"):
        raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ModelError(
            f"the adapter config {path} holds a JSON {type(raw).__name__}, not an object", "save the adapter again"
        )
    if raw.get("peft_type") != "LORA":
        raise ModelError(
            f"{path} has peft_type {raw.get('peft_type')!r}; lorafuse loads LoRA adapters only",
            "use peft to load this adapter type",
        )
    if raw.get("target_modules") is None:
        raise ModelError(
            f"{path} has no target_modules (peft would guess from the architecture)",
            'add "target_modules": ["q_proj", "v_proj", ...] naming the layers the adapter trained',
        )
    cfg = {**_PEFT_DEFAULTS, **raw}
    _check_numbers(cfg, path)
    return cfg


def _check_numbers(cfg: dict, path: Path) -> None:
    """r, lora_alpha, lora_dropout and the per-layer patterns hold numbers in range (a string "16" is refused)."""
    import math

    def bad(key: str, value, kind: str) -> ModelError:
        return ModelError(f"{path}: {key}={value!r} is not {kind}", f"write {key} in that file as {kind}, unquoted")

    numbers = [
        ("r", cfg["r"], int, 1),
        ("lora_alpha", cfg["lora_alpha"], float, 0),
        ("lora_dropout", cfg["lora_dropout"], float, 0),
    ]
    for table, kind, low in (("rank_pattern", int, 1), ("alpha_pattern", float, 0)):
        if not isinstance(cfg[table], dict):
            raise bad(table, cfg[table], "a mapping of layer patterns to numbers")
        numbers += [(f"{table}[{k!r}]", v, kind, low) for k, v in cfg[table].items()]
    for key, value, kind, low in numbers:
        ok = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
        if not ok or not math.isfinite(value) or value < low or (key == "lora_dropout" and value >= 1):
            words = "a whole number >= 1" if kind is int else f"a finite number >= {low}"
            raise bad(key, value, words + (" and < 1" if key == "lora_dropout" else ""))


def read_lorafuse_facts(adapter_dir) -> dict | None:
    """lorafuse.json of an adapter folder, or None for an adapter peft (or another tool) wrote."""
    return read_facts(adapter_dir)


def trained_quant(adapter_dir, default: str = "nf4") -> str:
    """How the adapter's base was quantized in training (lorafuse.json), else `default` (or no adapter)."""
    facts = read_facts(adapter_dir) if adapter_dir else None
    quant = ((facts or {}).get("base") or {}).get("quant")
    return quant if quant in ("nf4", "none") else default


def load_adapter(model, adapter_dir, is_trainable=False):
    """Apply the adapter in `adapter_dir` (ours or peft's) to `model` (a base without LoRA) and load its tensors.

    LoRA goes on exactly the modules peft would target (names list, regex string, "all-linear", exclude_modules,
    layers_to_transform, modules_to_save excluded) with peft's r/alpha (rank_pattern/alpha_pattern), rsLoRA and DoRA.
    Strict: every tensor of the file must land and every LoRA parameter must get one, else ModelError listing them.
    is_trainable=False freezes the adapter and puts the model in eval mode (inference), as peft does.
    The prompt format the adapter was trained with (lorafuse.model.prompt_format) goes on `model_state(model).prompt`.
    """
    cfg = read_adapter_config(adapter_dir)
    _check_supported(cfg, Path(adapter_dir) / CONFIG_NAME)
    if lora_layers(model):
        raise ModelError("the model already has LoRA layers", "load the adapter into a freshly loaded base model")
    tensors = _read_tensors(Path(adapter_dir).expanduser())
    _grow_vocab(model, adapter_dir)
    save_names = resolve_modules_to_save(model, cfg["modules_to_save"] or [])
    targets = resolve_targets(model, cfg, save_names)
    rows = token_rows.rows_in_config(model, cfg["trainable_token_indices"])
    _check_fits(model, cfg, tensors, targets, save_names, {k: (len(ids), d) for k, (ids, d) in rows.items()})
    _apply(model, cfg, targets)
    token_rows.attach_saved(model, rows, {k: tensors[PREFIX + k] for k in rows})
    with torch.no_grad():
        for key, value in tensors.items():
            param = model.get_parameter(key[len(PREFIX) :])
            param.copy_(value.to(param.dtype))
    model_state(model).prompt = read_prompt_format(adapter_dir)  # how generate/chat prompt it (lorafuse.json)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def _check_supported(cfg: dict, path: Path) -> None:
    for key, allowed in _UNSUPPORTED.items():
        if cfg.get(key) not in allowed:
            raise ModelError(
                f"{path}: {key}={cfg[key]!r} is a peft feature lorafuse does not implement",
                f"load this adapter with peft, or retrain with {key}={allowed[0]!r}",
            )
    init = str(cfg.get("init_lora_weights")).lower()
    if any(init.startswith(p) for p in ("pissa", "olora", "corda", "loftq", "lora_ga")):  # these rewrite W at init
        raise ModelError(
            f"{path}: init_lora_weights={cfg['init_lora_weights']!r} adapters change the base weights "
            "at init, so the saved tensors alone do not define the function",
            "convert it with peft (save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
            'and set "init_lora_weights": true',
        )


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    fix = "save the adapter again (a checkpoint-N/adapter folder of the run holds an earlier copy)"
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        with reading(folder / WEIGHTS_NAME, "the adapter weights", ModelError, fix=fix):
            return load_file(str(folder / WEIGHTS_NAME))
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        with reading(folder / LEGACY_WEIGHTS_NAME, "the adapter weights", ModelError, fix=fix):
            return torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise ModelError(
        f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}",
        "the adapter save was interrupted or files were lost: save it again",
    )


def _is_linear(module) -> bool:
    from lorafuse.lora.linear import NF4Linear

    return isinstance(module, (nn.Linear, NF4Linear))


def _peft_target_match(cfg: dict, name: str, targets, save_names) -> bool:
    """peft 0.21.2's check_target_module_exists (tuners_utils.py), for one module name."""
    exclude = cfg.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str) else _matches_list(name, exclude)):
        return False
    if _under_modules_to_save(name, save_names):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not _matches_list(name, targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = cfg.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for p in patterns:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
        if match:
            break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def resolve_targets(model, cfg: dict, save_names) -> dict[str, tuple[int, float]]:
    """{full module name: (r, alpha)} for the modules peft would put LoRA on, given this adapter config."""
    from lorafuse.model.load import output_head

    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        head = output_head(model)
        targets = [n for n, m in model.named_modules() if _is_linear(m) and m is not head]
    names = [n for n, _ in model.named_modules() if n and _peft_target_match(cfg, n, targets, save_names)]
    bad = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names if not _is_linear(model.get_submodule(n))]
    if bad:
        raise ModelError(
            f"the adapter targets modules that are not linear layers: {', '.join(bad[:4])}",
            "lorafuse puts LoRA on linear layers only; load this adapter with peft",
        )
    if not names:
        raise ModelError(
            f"target_modules {cfg['target_modules']!r} matches no module of this model "
            f"({_model_name(model)}); the adapter was trained on {cfg.get('base_model_name_or_path')}",
            "load the base model the adapter was trained on",
        )
    return {
        n: (
            _pattern_value(cfg["rank_pattern"], n, cfg["r"]),
            _pattern_value(cfg["alpha_pattern"], n, cfg["lora_alpha"]),
        )
        for n in names
    }


def _pattern_value(pattern: dict, name: str, default):
    """peft's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name) wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _model_name(model) -> str:
    return str(_base_name(model) or type(model).__name__)


def _grow_vocab(model, adapter_dir) -> None:
    """An adapter trained with new tokens (lorafuse.json vocab_size above the base's rows): resize the base to it,
    as its users do with transformers (the new rows' values come from the adapter's token rows)."""
    size = (read_lorafuse_facts(adapter_dir) or {}).get("vocab_size")
    if size and size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(size, mean_resizing=False)


def _check_fits(model, cfg, tensors, targets, save_names, row_shapes) -> None:
    """Every expected tensor present with the model's shapes; a dimension clash means another base model.
    row_shapes: {name: shape} of the token-row tensors the config names (without the prefix)."""
    expected, rank_dims = {PREFIX + k: v for k, v in row_shapes.items()}, {}
    for name, (r, _) in targets.items():
        m = model.get_submodule(name)
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, r)
        rank_dims[f"{PREFIX}{name}.lora_A.weight"], rank_dims[f"{PREFIX}{name}.lora_B.weight"] = 0, 1
        if cfg["use_dora"]:
            expected[f"{PREFIX}{name}.lora_magnitude_vector"] = (m.out_features,)
    optional = set()
    for name in save_names:
        direct = any(name.endswith(t) for t in cfg["modules_to_save"] or [])
        for pname, p in model.get_submodule(name).named_parameters():
            expected[f"{PREFIX}{name}.{pname}"] = tuple(p.shape)
            if not direct:  # a tied partner: peft saves it only with ensure_weight_tying
                optional.add(f"{PREFIX}{name}.{pname}")
    trained_on = cfg.get("base_model_name_or_path")
    rank_clash, base_clash = [], []
    for key in sorted(set(expected) & set(tensors)):
        got, want = tuple(tensors[key].shape), expected[key]
        if got == want:
            continue
        rdim = rank_dims.get(key)
        same_model_dims = len(got) == len(want) and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != rdim)
        clash = rank_clash if rdim is not None and same_model_dims else base_clash
        clash.append(f"{key}: adapter {got}, model {want}")
    if base_clash:
        raise ModelError(
            f"this adapter was trained on {trained_on!r}, but the model given is {_model_name(model)!r} "
            f"and its layer shapes differ: {_few(base_clash)}",
            f"load the base model the adapter was trained on ({trained_on}) and pass it to load_adapter",
        )
    if rank_clash:
        raise ModelError(
            f"the tensors' rank differs from adapter_config.json (r={cfg['r']}, rank_pattern="
            f"{cfg['rank_pattern']}): {_few(rank_clash)}",
            "fix r / rank_pattern in adapter_config.json to the rank the tensors have",
        )
    missing, unexpected = sorted(set(expected) - set(tensors) - optional), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"the adapter's tensors do not match its config on this model ({_model_name(model)}, "
            f"adapter trained on {trained_on!r}): missing {_few(missing)}; unexpected {_few(unexpected)}",
            "check that target_modules/modules_to_save in adapter_config.json describe the saved tensors "
            f"(keys start with {PREFIX!r}) and that this is the base it was trained on",
        )


def _few(items, n=6) -> str:
    return "none" if not items else ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _apply(model, cfg: dict, targets: dict) -> None:
    """apply_lora with the adapter's settings; layers whose rank/alpha differ (patterns) are wrapped one by one."""
    from lorafuse.lora.linear import LoRALinear
    from lorafuse.model.inject import apply_lora

    groups: dict[tuple, list[str]] = {}
    for name, ra in targets.items():
        groups.setdefault(ra, []).append(name)
    (r, alpha), names = max(groups.items(), key=lambda kv: len(kv[1]))
    common = dict(dropout=float(cfg["lora_dropout"]), rslora=bool(cfg["use_rslora"]), dora=bool(cfg["use_dora"]))
    init = "gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming"
    # full names: under the list rule (name == t or name ends with "." + t) each selects exactly itself
    apply_lora(
        model, r=r, alpha=alpha, targets=names, modules_to_save=cfg["modules_to_save"] or None, init=init, **common
    )
    for (r, alpha), names in groups.items():
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, LoRALinear):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear.from_linear(module, r=r, alpha=alpha, init=init, **common))

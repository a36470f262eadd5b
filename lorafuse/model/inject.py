"""Put LoRA into a transformers model in place: freeze the base, swap matched linears for `LoRALinear` by name.

Matching follows peft 0.21.2 (`check_target_module_exists`, `_maybe_include_all_linear_layers`), so an adapter
config we write targets the same modules when peft reads it:
  * targets as a str: a regex, `re.fullmatch` against the full module name ("model.layers.0.self_attn.q_proj");
  * targets as a list: a module matches if `name == t` or `name.endswith("." + t)` for some t;
  * "all-linear" (any case): every nn.Linear / NF4Linear except the output head (`model.get_output_embeddings()`);
  * `exclude` uses the same str/list rules; modules in `modules_to_save` (and their children) are never targeted.
A matched module that is not a linear layer is an error, as in peft. Zero matches is an error that lists the
linear layers the model has.

modules_to_save (peft: `key.endswith(m)`): peft trains a deep copy and keeps the original frozen; we train the
module in place (same forward, same saved tensor, no second copy in memory). A module whose weight is shared
with another (a tied embed_tokens / lm_head pair) stays tied: training one trains both. That is peft's
`ensure_weight_tying=True` behaviour (peft then saves both keys); peft's default (`False`) unties them by
copying, so only one of the pair changes. We record `ensure_weight_tying` and the full names of every module
trained in place so the adapter writer saves the same keys peft does.

Parameter counting is peft's `get_nb_trainable_parameters`: every distinct parameter once, and a 4-bit weight
as (packed uint8 elements) * 2, which is how peft counts bitsandbytes' Params4bit. Difference: peft's "all"
also counts the trainable copies of modules_to_save; we count each real tensor once.
"""

from __future__ import annotations

import re

from torch import nn

from lorafuse.errors import ConfigError, LorafuseError
from lorafuse.lora.linear import LoRALinear, NF4Linear
from lorafuse.model_state import model_state

_LINEAR_TYPES = (nn.Linear, NF4Linear, LoRALinear)


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def find_linear_names(model: nn.Module) -> list[str]:
    """Sorted short names ("q_proj", "down_proj", ...) of the linear layers "all-linear" would target."""
    head = _output_head_name(model)
    inner = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LoRALinear) for c, _ in m.named_children()}
    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, _LINEAR_TYPES) and n != head and n not in inner
        }
    )


def _matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return name in pattern or any(name.endswith("." + t) for t in pattern)


def _in_modules_to_save(name: str, modules_to_save: list[str]) -> bool:
    # peft's rule for excluding modules_to_save (and anything inside them) from targeting.
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def _match_targets(model, targets, exclude, modules_to_save) -> list[str]:
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    head = _output_head_name(model) if all_linear else None
    matched, not_linear = [], []
    for name, module in model.named_modules():
        if not name or (exclude and _matches(name, exclude)) or _in_modules_to_save(name, modules_to_save):
            continue
        if all_linear:
            hit = isinstance(module, (nn.Linear, NF4Linear)) and name != head
        else:
            hit = _matches(name, targets)
        if hit:
            (matched if isinstance(module, (nn.Linear, NF4Linear)) else not_linear).append(name)
    if not_linear:
        kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in not_linear[:5])
        raise ConfigError(
            f"lora.targets={targets!r} matches {len(not_linear)} module(s) that are not linear layers: {kinds}",
            "LoRA applies to linear layers only; name linear layers (e.g. q_proj, v_proj) or use a regex "
            "that matches only them",
        )
    if not matched:
        raise _no_match_error(model, targets, exclude)
    return matched


def _no_match_error(model, targets, exclude) -> LorafuseError:
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
    short = find_linear_names(model)
    problem = (
        f"lora.targets={targets!r}{f' (exclude={exclude!r})' if exclude else ''} matched no module. "
        f"The model's linear layers are named {short or 'nothing (it has no nn.Linear)'}; "
        f"full names look like {linears[:3]}"
    )
    fix = (
        "set lora.targets to a list of short names (e.g. [q_proj, v_proj]; a name matches itself and any "
        "module ending in '.<name>'), to a regex matched against the full name (e.g. "
        "'.*layers\\.\\d+\\.self_attn\\.(q|v)_proj'), or to \"all-linear\""
    )
    return ConfigError(problem, fix)


def _check_args(r, alpha, dropout, init, targets, modules_to_save, exclude) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"lora.r={r!r} is not a positive integer", "set lora.r to an integer >= 1 (8-64 is usual)")
    if not alpha > 0:
        raise ConfigError(f"lora.alpha={alpha!r} must be > 0", "set lora.alpha (commonly 2*r)")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout={dropout!r} is outside [0, 1)", "set lora.dropout to e.g. 0.05, or 0")
    if init not in ("kaiming", "gaussian"):
        raise ConfigError(f"lora.init={init!r} is unknown", "use 'kaiming' (peft's default) or 'gaussian'")
    for key, value in (("targets", targets), ("exclude", exclude)):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise ConfigError(
                    f"lora.{key}={value!r} is not a valid regex: {e}", "fix the regex, or give a list of module names"
                ) from None
        elif value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value)):
            raise ConfigError(
                f"lora.{key}={value!r} must be a list of names or a regex string",
                'e.g. lora.targets=[q_proj, v_proj] or lora.targets="all-linear"',
            )
    if modules_to_save is not None and (
        isinstance(modules_to_save, str) or not all(isinstance(m, str) for m in modules_to_save)
    ):
        raise ConfigError(
            f"lora.modules_to_save={modules_to_save!r} must be a list of module names",
            "e.g. lora.modules_to_save=[embed_tokens, lm_head]",
        )


def _check_rank(model: nn.Module, names: list[str], r: int) -> None:
    """r above a layer's smaller dimension adds parameters but no rank (B @ A cannot exceed it): refuse it."""
    for name in names:
        m = model.get_submodule(name)
        if r > min(m.in_features, m.out_features):
            raise ConfigError(
                f"lora.r={r} is larger than the layer {name} allows: its weight is {m.out_features} x {m.in_features} "
                f"(out x in), so its rank is at most {min(m.in_features, m.out_features)}",
                f"set lora.r to at most {min(m.in_features, m.out_features)}, or leave that layer out of lora.targets",
            )


def _check_not_applied(model: nn.Module) -> None:
    if model_state(model).lora is not None or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LorafuseError(
            "LoRA is already applied to this model (apply_lora was called on it before)",
            "call apply_lora once per model; to change r/targets reload the base model with lorafuse.load_model "
            "and apply again; to continue training a saved adapter use load_adapter(model, dir, is_trainable=True)",
        )


def _trainable_modules(model: nn.Module, modules_to_save: list[str]) -> tuple[list[str], bool]:
    """Full names of the modules to train in place (with tied partners) and whether any tie was found."""
    names = [
        n for n, _ in model.named_modules(remove_duplicate=False) if n and any(n.endswith(m) for m in modules_to_save)
    ]
    for m in modules_to_save:
        if not any(n.endswith(m) for n in names):
            raise ConfigError(
                f"lora.modules_to_save entry {m!r} matches no module",
                f"use module names of this model, e.g. {find_linear_names(model)[:3]} or embed_tokens / lm_head",
            )
    chosen = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    partners = [
        n
        for n, mod in model.named_modules(remove_duplicate=False)
        if n and n not in names and any(id(p) in chosen for p in mod.parameters(recurse=False))
    ]
    for n in names:
        if any(
            isinstance(m, NF4Linear) or (isinstance(m, LoRALinear) and m.is_nf4)
            for m in model.get_submodule(n).modules()
        ):
            raise ConfigError(
                f"lora.modules_to_save entry {n!r} is a 4-bit (NF4) layer and cannot be trained",
                "load the model so that this module is not quantized, or remove it from modules_to_save",
            )
    return sorted(set(names + partners)), bool(partners)


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets: str | list[str] = "all-linear",
    rslora: bool = False,
    dora: bool = False,
    modules_to_save: list[str] | None = None,
    init: str = "kaiming",
    exclude: str | list[str] | None = None,
) -> nn.Module:
    """Freeze `model`, replace every matched nn.Linear / NF4Linear by a LoRALinear, and return the same model.

    See the module docstring for matching and modules_to_save. Records the settings in `model_state(model).lora`
    (read by save_adapter): target_modules is the list of names given, the regex string, or for "all-linear"
    the full paths of the wrapped layers (peft 0.21.2 writes full paths too; its list also keeps the layers that
    exclude_modules / modules_to_save then skip, ours leaves them out: peft targets the same set either way).
    """
    _check_not_applied(model)
    _check_args(r, alpha, dropout, init, targets, modules_to_save, exclude)
    targets = list(dict.fromkeys(targets)) if isinstance(targets, (list, tuple)) else targets
    exclude = list(exclude) if isinstance(exclude, tuple) else exclude
    save = list(dict.fromkeys(modules_to_save or []))
    names = _match_targets(model, targets, exclude, save)
    _check_rank(model, names, r)
    trained, tied = _trainable_modules(model, save) if save else ([], False)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.from_linear(
            getattr(parent, child), r=r, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora, init=init
        )
        setattr(parent, child, layer)
    for name in trained:
        model.get_submodule(name).requires_grad_(True)
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    model_state(model).lora = {
        "r": r,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": sorted(names) if all_linear else targets,
        "rslora": rslora,
        "dora": dora,
        "init": init,
        "modules_to_save": save or None,
        "exclude_modules": exclude,
        "ensure_weight_tying": tied,
        "trained_module_names": trained,
    }
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) counted as peft's get_nb_trainable_parameters (NF4 weight: packed elements * 2)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    seen = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (NF4Linear, LoRALinear)) and not isinstance(w, nn.Parameter) and id(w) not in seen:
            seen.add(id(w))
            total += w.packed.numel() * 2
    # peft keeps a trainable copy of each modules_to_save module beside the frozen original and counts both; we train
    # the module in place, so add one copy's size to report peft's numbers for the same model and config.
    names = (model_state(model).lora or {}).get("trained_module_names") or []
    copies = {id(p): p.numel() for n in names for p in model.get_submodule(n).parameters()}
    return trainable, total + sum(copies.values())


def print_trainable_parameters(model: nn.Module) -> None:
    """Print peft's exact line: "trainable params: X || all params: Y || trainable%: Z"."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

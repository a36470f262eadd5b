"""LoRA adapters in peft's on-disk format: save, load, and the atomic folder writer.

An adapter folder (what `save_adapter` writes, what `PeftModel.from_pretrained(base, folder)` reads):

    adapter_config.json        every field peft 0.21.2 writes for a LoraConfig (sorted, indent 2), so peft rebuilds
                               the same function and has no unknown key to warn about
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r),
                               .lora_magnitude_vector (out,) with DoRA (no ".weight" on disk), and for each
                               modules_to_save module its full tensors under base_model.model.<module>.<param>;
                               metadata {"format": "pt"}
    README.md                  a peft-style model card (base_model, library_name: peft, tags)
    lorafuse.json              what peft has no field for: the base's quantization (NF4, blocksize, double quant),
                               compute dtype, lorafuse version. peft never opens it, so it cannot warn
    tokenizer files            tokenizer.json, tokenizer_config.json, chat_template.jinja: the exact template trained on

The function of a targeted linear (peft's): y = W x + b + s * B(A(dropout(x))), s = alpha/r (alpha/sqrt(r) with
rsLoRA); DoRA rescales rows: W' = (m / ||W + s*B@A||_row)[:, None] * (W + s*B@A).

Dtype policy: tensors are written in their parameters' dtype (fp32 LoRA weights -> fp32, like peft) unless `dtype=`
asks for another; on load each tensor is cast to the dtype of the parameter it lands in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lorafuse.atomic import atomic_folder
from lorafuse.errors import LorafuseError, ModelError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
LORAFUSE_NAME = "lorafuse.json"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose LoraConfig field set we write

# peft 0.21.2's LoraConfig fields at their defaults (VERIFIED against LoraConfig().to_dict()); save_adapter fills in
# the ones that describe our adapter. Writing the full set means peft warns about nothing and defaults nothing.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Config values that change the function in ways lorafuse does not implement: key -> value(s) we accept.
_UNSUPPORTED = {
    "bias": ("none",), "lora_bias": (False,), "fan_in_fan_out": (False,), "use_qalora": (False,),
    "layer_replication": (None,), "target_parameters": (None, []), "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,), "arrow_config": (None,), "use_bdlora": (None, False),
}


# ----------------------------------------------------------------------------------------------------------------
# save

def save_adapter(model, out_dir, base_model_name_or_path=None, dtype=None, tokenizer=None) -> Path:
    """Write `model`'s LoRA adapter to `out_dir` in peft's format (see module docstring), atomically.

    base_model_name_or_path: written to the config and card (default: the path the base was loaded from).
    dtype: cast the saved tensors (e.g. torch.bfloat16 halves the size); default keeps the parameters' dtype.
    tokenizer: the tokenizer trained with (its chat template is what the adapter learned); default: the base's.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ModelError("the model has no LoRA layers, so there is no adapter to save",
                         "call lorafuse.apply_lora(model, ...) (or load_adapter) before save_adapter")
    base_name = base_model_name_or_path or _base_name(model)
    config = adapter_config_for(model, layers, base_name)
    tensors = adapter_state_dict(model, layers, saved_module_names(model), dtype)
    tokenizer = tokenizer if tokenizer is not None else _base_tokenizer(model)
    with atomic_folder(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / LORAFUSE_NAME).write_text(json.dumps(_lorafuse_facts(model, tensors), indent=2, sort_keys=True))
        (tmp / "README.md").write_text(_model_card(base_name, config), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def lora_layers(model) -> dict[str, nn.Module]:
    """{full module name: LoRALinear} in model order."""
    from lorafuse.lora.linear import LoRALinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_config_for(model, layers: dict, base_name: str | None) -> dict:
    """The full peft LoraConfig dict describing `layers` (ranks/alphas differing per layer -> rank/alpha_pattern)."""
    info = dict(getattr(model, "lorafuse_lora", None) or {})
    first = next(iter(layers.values()))
    ranks = [m.r for m in layers.values()]
    alphas = [m.alpha for m in layers.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    save_names = saved_module_names(model)
    init = info.get("init", "kaiming")
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_name,
        r=r,
        lora_alpha=_plain_number(alpha),
        lora_dropout=float(info.get("dropout", getattr(first.dropout, "p", 0.0))),
        use_rslora=bool(first.use_rslora),
        use_dora=bool(first.use_dora),
        target_modules=_target_modules_entry(model, set(layers), save_names),
        modules_to_save=sorted(info.get("modules_to_save") or []) or None,
        ensure_weight_tying=bool(info.get("ensure_weight_tying", False)),
        init_lora_weights="gaussian" if init == "gaussian" else True,
        rank_pattern={re.escape(n): m.r for n, m in layers.items() if m.r != r},
        alpha_pattern={re.escape(n): _plain_number(m.alpha) for n, m in layers.items() if m.alpha != alpha},
    )
    return config


def _plain_number(x):
    return int(x) if float(x).is_integer() else float(x)


def _target_modules_entry(model, targeted: set[str], save_names: list[str]) -> list[str]:
    """Short names (q_proj, ...) when, under peft's list rule, they select exactly the LoRA layers; else full paths."""
    short = sorted({n.rpartition(".")[2] for n in targeted})
    hits = {n for n, _ in model.named_modules()
            if _matches_list(n, short) and not _under_modules_to_save(n, save_names)}
    return short if hits == targeted else sorted(targeted)


def saved_module_names(model) -> list[str]:
    """Full names of the modules trained whole (modules_to_save, plus tied partners), as apply_lora recorded them."""
    info = getattr(model, "lorafuse_lora", None) or {}
    if "trained_module_names" in info:
        return list(info["trained_module_names"])
    return resolve_modules_to_save(model, info.get("modules_to_save") or [])


def resolve_modules_to_save(model, entries) -> list[str]:
    """Full names selected by modules_to_save entries (peft's rule: `name.endswith(entry)`), plus any module that
    shares a parameter with one of them (a tied embed_tokens / lm_head pair: peft saves both keys)."""
    if not entries:
        return []
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n and any(n.endswith(t) for t in entries)]
    chosen = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    partners = [n for n, m in model.named_modules(remove_duplicate=False) if n and n not in names
                and any(id(p) in chosen for p in m.parameters(recurse=False))]
    return sorted(set(names + partners))


def adapter_state_dict(model, layers: dict, save_names, dtype=None) -> dict[str, torch.Tensor]:
    """peft's on-disk adapter tensors, detached, contiguous, on CPU."""
    out = {}
    for name, m in layers.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if m.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    for name in save_names:
        for pname, p in model.get_submodule(name).named_parameters(remove_duplicate=False):
            out[f"{PREFIX}{name}.{pname}"] = p
    # clone: tied tensors (embed/lm_head) must not share storage in safetensors
    return {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
            .contiguous().clone() for k, v in sorted(out.items())}


def _base_name(model) -> str | None:
    base = getattr(model, "lorafuse_base", None) or {}
    return base.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _base_tokenizer(model):
    """The base's tokenizer (as load_model makes it), when the base came from a local folder."""
    folder = (getattr(model, "lorafuse_base", None) or {}).get("folder") or _base_name(model)
    if not folder or not Path(folder).is_dir():
        return None
    from lorafuse.model.load import load_tokenizer

    try:
        return load_tokenizer(str(folder))
    except LorafuseError:
        return None


def _lorafuse_facts(model, tensors) -> dict:
    """lorafuse.json: how the base looked during training, which peft's config cannot say."""
    import lorafuse
    from lorafuse.quant.nf4 import NF4Weight

    base = dict(getattr(model, "lorafuse_base", None) or {})
    nf4 = next((m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Weight)), None)
    if nf4 is not None:  # the weights themselves are the ground truth for the quantization settings
        base.update(quant="nf4", blocksize=nf4.blocksize, double_quant=bool(nf4.double_quant))
    else:
        base.setdefault("quant", "none")
    if "compute_dtype" not in base:
        emb = model.get_input_embeddings().weight
        base["compute_dtype"] = str(emb.dtype).removeprefix("torch.")
    return {
        "format": 1,
        "lorafuse_version": lorafuse.__version__,
        "base": {k: base.get(k) for k in ("name_or_path", "quant", "blocksize", "double_quant", "compute_dtype",
                                           "prequantized") if k in base},
        "adapter_dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
    }


def _model_card(base_name: str | None, config: dict) -> str:
    import lorafuse

    front = ["---"]
    if base_name:
        front.append(f"base_model: {json.dumps(base_name)}")
    front += ["library_name: peft", "pipeline_tag: text-generation", "tags:"]
    if base_name:
        front.append(f"- {json.dumps('base_model:adapter:' + base_name)}")
    front += ["- lora", "- transformers", "- lorafuse", "---", ""]
    variant = ", ".join(k for k, on in (("rsLoRA", config["use_rslora"]), ("DoRA", config["use_dora"])) if on)
    body = f"""# LoRA adapter{f' for {base_name}' if base_name else ''}

Trained with lorafuse: r={config['r']}, lora_alpha={config['lora_alpha']}{f', {variant}' if variant else ''}.
Loads with peft; the tokenizer and chat template used in training are in this folder.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({json.dumps(base_name or '<base model>')})
model = PeftModel.from_pretrained(base, "<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```

`lorafuse.json` records how the base was quantized during training; `lorafuse merge` reads it to merge into the
same weights the adapter was trained against.

### Framework versions

- PEFT {PEFT_FORMAT_VERSION}
- lorafuse {lorafuse.__version__}
"""
    return "\n".join(front) + body


# ----------------------------------------------------------------------------------------------------------------
# load

def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json (ours or peft's) with peft's defaults filled in for absent keys; checked for LoRA."""
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise ModelError(f"adapter folder not found: {folder}",
                         "pass the folder that save_adapter (or peft's save_pretrained) wrote")
    path = folder / CONFIG_NAME
    if not path.is_file():
        hint = ("it holds config.json, so it looks like a full (merged) model: load it with load_model instead"
                if (folder / "config.json").is_file() else
                "pass the folder that holds adapter_config.json and adapter_model.safetensors")
        raise ModelError(f"{folder} has no {CONFIG_NAME}, so it is not a LoRA adapter folder", hint)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", "re-save the adapter") from None
    if raw.get("peft_type") != "LORA":
        raise ModelError(f"{path} has peft_type {raw.get('peft_type')!r}; lorafuse loads LoRA adapters only",
                         "use peft to load this adapter type")
    if raw.get("target_modules") is None:
        raise ModelError(f"{path} has no target_modules (peft would guess from the architecture)",
                         'add "target_modules": ["q_proj", "v_proj", ...] naming the layers the adapter trained')
    return {**_PEFT_DEFAULTS, **raw}


def read_lorafuse_facts(adapter_dir) -> dict | None:
    """lorafuse.json of an adapter folder, or None for an adapter peft (or another tool) wrote."""
    path = Path(adapter_dir).expanduser() / LORAFUSE_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_adapter(model, adapter_dir, is_trainable=False):
    """Apply the adapter in `adapter_dir` (ours or peft's) to `model` (a base without LoRA) and load its tensors.

    LoRA goes on exactly the modules peft would target (names list, regex string, "all-linear", exclude_modules,
    layers_to_transform, modules_to_save excluded) with peft's r/alpha (rank_pattern/alpha_pattern), rsLoRA and DoRA.
    Strict: every tensor of the file must land and every LoRA parameter must get one, else ModelError listing them.
    is_trainable=False freezes the adapter and puts the model in eval mode (inference), as peft does.
    """
    cfg = read_adapter_config(adapter_dir)
    _check_supported(cfg, Path(adapter_dir) / CONFIG_NAME)
    if lora_layers(model):
        raise ModelError("the model already has LoRA layers", "load the adapter into a freshly loaded base model")
    tensors = _read_tensors(Path(adapter_dir).expanduser())
    save_names = resolve_modules_to_save(model, cfg["modules_to_save"] or [])
    targets = resolve_targets(model, cfg, save_names)
    _check_fits(model, cfg, tensors, targets, save_names)
    _apply(model, cfg, targets)
    with torch.no_grad():
        for key, value in tensors.items():
            param = model.get_parameter(key[len(PREFIX):])
            param.copy_(value.to(param.dtype))
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def _check_supported(cfg: dict, path: Path) -> None:
    for key, allowed in _UNSUPPORTED.items():
        if cfg.get(key) not in allowed:
            raise ModelError(f"{path}: {key}={cfg[key]!r} is a peft feature lorafuse does not implement",
                             f"load this adapter with peft, or retrain with {key}={allowed[0]!r}")
    init = str(cfg.get("init_lora_weights")).lower()
    if any(init.startswith(p) for p in ("pissa", "olora", "corda", "loftq", "lora_ga")):  # these rewrite W at init
        raise ModelError(f"{path}: init_lora_weights={cfg['init_lora_weights']!r} adapters change the base weights "
                         "at init, so the saved tensors alone do not define the function",
                         "convert it with peft (save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
                         'and set "init_lora_weights": true')


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS_NAME))
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        return torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise ModelError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}",
                     "the adapter save was interrupted or files were lost: save it again")


def _is_linear(module) -> bool:
    from lorafuse.lora.linear import NF4Linear

    return isinstance(module, (nn.Linear, NF4Linear))


def _matches_list(name: str, entries) -> bool:
    """peft's list rule: a full name equal to an entry, or ending with "." + entry."""
    return name in entries or any(name.endswith("." + e) for e in entries)


def _under_modules_to_save(name: str, save_names) -> bool:
    return any(name == s or name.startswith(s + ".") for s in save_names)


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
        raise ModelError(f"the adapter targets modules that are not linear layers: {', '.join(bad[:4])}",
                         "lorafuse puts LoRA on linear layers only; load this adapter with peft")
    if not names:
        raise ModelError(f"target_modules {cfg['target_modules']!r} matches no module of this model "
                         f"({_model_name(model)}); the adapter was trained on {cfg.get('base_model_name_or_path')}",
                         "load the base model the adapter was trained on")
    return {n: (_pattern_value(cfg["rank_pattern"], n, cfg["r"]),
                _pattern_value(cfg["alpha_pattern"], n, cfg["lora_alpha"])) for n in names}


def _pattern_value(pattern: dict, name: str, default):
    """peft's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name) wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _model_name(model) -> str:
    return str(_base_name(model) or type(model).__name__)


def _check_fits(model, cfg, tensors, targets, save_names) -> None:
    """Every expected tensor present with the model's shapes; a dimension clash means another base model."""
    expected, rank_dims = {}, {}
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
        raise ModelError(f"this adapter was trained on {trained_on!r}, but the model given is {_model_name(model)!r} "
                         f"and its layer shapes differ: {_few(base_clash)}",
                         f"load the base model the adapter was trained on ({trained_on}) and pass it to load_adapter")
    if rank_clash:
        raise ModelError(f"the tensors' rank differs from adapter_config.json (r={cfg['r']}, rank_pattern="
                         f"{cfg['rank_pattern']}): {_few(rank_clash)}",
                         "fix r / rank_pattern in adapter_config.json to the rank the tensors have")
    missing, unexpected = sorted(set(expected) - set(tensors) - optional), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(f"the adapter's tensors do not match its config on this model ({_model_name(model)}, "
                         f"adapter trained on {trained_on!r}): missing {_few(missing)}; unexpected {_few(unexpected)}",
                         "check that target_modules/modules_to_save in adapter_config.json describe the saved tensors "
                         f"(keys start with {PREFIX!r}) and that this is the base it was trained on")


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
    apply_lora(model, r=r, alpha=alpha, targets=names, modules_to_save=cfg["modules_to_save"] or None,
               init=init, **common)
    for (r, alpha), names in groups.items():
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, LoRALinear):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear.from_linear(module, r=r, alpha=alpha, init=init, **common))


"""LoRA adapters in peft's on-disk format: saving (loading is in `adapter_load`).

An adapter folder (what `save_adapter` writes, what `PeftModel.from_pretrained(base, folder)` reads):

    adapter_config.json        every field peft 0.21.2 writes for a LoraConfig (sorted, indent 2), so peft rebuilds
                               the same function and has no unknown key to warn about
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r),
                               .lora_magnitude_vector (out,) with DoRA (no ".weight" on disk), and for each
                               modules_to_save module its full tensors under base_model.model.<module>.<param>;
                               metadata {"format": "pt"}
                               trainable token rows (lora/token_rows.py) under peft's keys
                               base_model.model.<embedding or head>.token_adapter.trainable_tokens_delta (k, D),
                               with trainable_token_indices in the config
    README.md                  a peft-style model card (base_model, library_name: peft, tags)
    lorafuse.json              what peft has no field for: the base's quantization (NF4, blocksize, double quant),
                               compute dtype, lorafuse version, and how the adapter was trained to be prompted
                               (format, template, chat_template, system_prompt, eos_token:
                               lorafuse.model.prompt_format). peft never opens it, so it cannot warn
    tokenizer files            tokenizer.json, tokenizer_config.json, chat_template.jinja: the chat template is the one
                               trained with (a plain format's equivalent Jinja, lorafuse.data.templates)

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

from lorafuse.errors import LorafuseError, ModelError
from lorafuse.io_errors import writing
from lorafuse.lora import token_rows
from lorafuse.model_state import model_state
from lorafuse.outputs import atomic_folder
from lorafuse.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
LORAFUSE_NAME = "lorafuse.json"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose LoraConfig field set we write

# peft 0.21.2's LoraConfig fields at their defaults (VERIFIED against LoraConfig().to_dict()); save_adapter fills in
# the ones that describe our adapter. Writing the full set means peft warns about nothing and defaults nothing.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}


# ----------------------------------------------------------------------------------------------------------------
# save


def save_adapter(model, out_dir, base_model_name_or_path=None, dtype=None, tokenizer=None, prompt=None) -> Path:
    """Write `model`'s LoRA adapter to `out_dir` in peft's format (see module docstring), atomically.

    base_model_name_or_path: written to the config and card (default: the path the base was loaded from).
    dtype: cast the saved tensors (e.g. torch.bfloat16 halves the size); default keeps the parameters' dtype.
    tokenizer: the tokenizer trained with; default: the base's.
    prompt: how the adapter was trained to be prompted (a PromptFormat); default: `model_state(model).prompt`, which
    the train job sets. Its chat template is saved with the tokenizer.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ModelError(
            "the model has no LoRA layers, so there is no adapter to save",
            "call lorafuse.apply_lora(model, ...) (or load_adapter) before save_adapter",
        )
    base_name = base_model_name_or_path or _base_name(model)
    config = adapter_config_for(model, layers, base_name)
    tensors = adapter_state_dict(model, layers, saved_module_names(model), dtype)
    tokenizer = tokenizer if tokenizer is not None else _base_tokenizer(model)
    prompt = prompt if prompt is not None else model_state(model).prompt
    facts = _lorafuse_facts(model, tensors, base_name, prompt)
    with writing(out_dir), atomic_folder(out_dir, "adapter") as tmp:  # safetensors, tokenizers raise their own types
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / LORAFUSE_NAME).write_text(json.dumps(facts, indent=2, sort_keys=True, ensure_ascii=False))
        vocab = model.get_input_embeddings().weight.shape[0]
        card = _model_card(model, out_dir, base_name, config, prompt, vocab)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, prompt.chat_template if prompt is not None else None)
    return Path(out_dir)


def _save_tokenizer(tokenizer, folder: Path, chat_template: str | None) -> None:
    """The tokenizer's files, with `chat_template` (the trained one) in place of its own when given."""
    own = getattr(tokenizer, "chat_template", None)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.chat_template = own


def lora_layers(model) -> dict[str, nn.Module]:
    """{full module name: LoRALinear} in model order."""
    from lorafuse.lora.linear import LoRALinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_config_for(model, layers: dict, base_name: str | None) -> dict:
    """The full peft LoraConfig dict describing `layers` (ranks/alphas differing per layer -> rank/alpha_pattern)."""
    info = dict(model_state(model).lora or {})
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
        trainable_token_indices=token_rows.peft_indices_entry(model),
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
    hits = {
        n for n, _ in model.named_modules() if _matches_list(n, short) and not _under_modules_to_save(n, save_names)
    }
    return short if hits == targeted else sorted(targeted)


def saved_module_names(model) -> list[str]:
    """Full names of the modules trained whole (modules_to_save, plus tied partners), as apply_lora recorded them."""
    info = model_state(model).lora or {}
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
    partners = [
        n
        for n, m in model.named_modules(remove_duplicate=False)
        if n and n not in names and any(id(p) in chosen for p in m.parameters(recurse=False))
    ]
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
    for name, p in model.named_parameters():
        if name.endswith(token_rows.VALUES_KEY):
            out[f"{PREFIX}{name}"] = p
    # clone: tied tensors (embed/lm_head) must not share storage in safetensors
    return {
        k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().clone()
        for k, v in sorted(out.items())
    }


def _base_name(model) -> str | None:
    base = model_state(model).base
    return base.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _base_tokenizer(model):
    """The base's tokenizer (as load_model makes it), when the base came from a local folder."""
    folder = model_state(model).base.get("folder") or _base_name(model)
    if not folder or not Path(folder).is_dir():
        return None
    from lorafuse.model.load import load_tokenizer

    try:
        return load_tokenizer(str(folder))
    except LorafuseError:
        return None


def _lorafuse_facts(model, tensors, base_name, prompt) -> dict:
    """lorafuse.json: how the base looked during training and how the adapter was trained to be prompted."""
    from lorafuse.model.prompt_format import PROMPT_KEYS
    from lorafuse.quant.nf4 import NF4Weight

    base = dict(model_state(model).base)
    nf4 = next((m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Weight)), None)
    if nf4 is not None:  # the weights themselves are the ground truth for the quantization settings
        base.update(quant="nf4", blocksize=nf4.blocksize, double_quant=bool(nf4.double_quant))
    else:
        base.setdefault("quant", "none")
    if "compute_dtype" not in base:
        emb = model.get_input_embeddings().weight
        base["compute_dtype"] = str(emb.dtype).removeprefix("torch.")
    return {
        "lorafuse_version": __version__,
        "base_model": base_name,
        "base": {
            k: base.get(k)
            for k in ("name_or_path", "quant", "blocksize", "double_quant", "compute_dtype", "prequantized")
            if k in base
        },
        "adapter_dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "vocab_size": model.get_input_embeddings().weight.shape[0],  # grown by new tokens: resize the base to it
        **(prompt.facts() if prompt is not None else dict.fromkeys(PROMPT_KEYS)),
    }


def _token_rows_note(config: dict, vocab_size: int) -> tuple[str, str]:
    """(the card's snippet line, its paragraph) for an adapter with trainable token rows (docs/tokens.md)."""
    if not config.get("trainable_token_indices"):
        return "", ""
    return (
        f"base.resize_token_embeddings({vocab_size})  # the vocabulary trained with; a no-op when it already is\n",
        "The adapter trains some embedding and output-head rows (`trainable_token_indices`: new tokens, or rows the "
        "base left untrained);\nthe resize gives a base the rows of tokens added in training, and the adapter "
        "supplies their values.\n\n",
    )


def _model_card(model, out_dir, base_name: str | None, config: dict, prompt, vocab_size: int) -> str:
    front = ["---"]
    if base_name:
        front.append(f"base_model: {json.dumps(base_name)}")
    front += ["library_name: peft", "pipeline_tag: text-generation", "tags:"]
    if base_name:
        front.append(f"- {json.dumps('base_model:adapter:' + base_name)}")
    front += ["- lora", "- transformers", "- lorafuse", "---", ""]
    variant = ", ".join(k for k, on in (("rsLoRA", config["use_rslora"]), ("DoRA", config["use_dora"])) if on)
    # A builtin base ("builtin:tiny-llama") is a lorafuse name: transformers reads the folder it was built in.
    hf_base = model_state(model).base.get("folder") if str(base_name).startswith("builtin:") else base_name
    here, base = json.dumps(str(out_dir)), json.dumps(str(hf_base or "<base model folder or hub id>"))
    trained = f"{prompt.format} rows, {prompt.template} template" if prompt is not None and prompt.format else None
    resize, rows_note = _token_rows_note(config, vocab_size)
    body = f"""# LoRA adapter{f" for {base_name}" if base_name else ""}

Trained with lorafuse: r={config["r"]}, lora_alpha={config["lora_alpha"]}{f", {variant}" if variant else ""}\
{f"; {trained}" if trained else ""}. Loads with peft.
The tokenizer in this folder carries the chat template used in training, and `lorafuse.json` records the format,
system prompt and EOS token, so `lorafuse generate` and `lorafuse chat` prompt the model the way it was trained:

```bash
lorafuse generate --model {json.dumps(str(base_name or hf_base))} --adapter {here} --prompt "..."
```

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({base})
{resize}model = PeftModel.from_pretrained(base, {here})
tokenizer = AutoTokenizer.from_pretrained({here})
```

{rows_note}`lorafuse.json` also records how the base was quantized during training; `lorafuse merge` reads it to
merge into the same weights the adapter was trained against.

### Framework versions

- PEFT {PEFT_FORMAT_VERSION}
- lorafuse {__version__}
"""
    return "\n".join(front) + body


def _matches_list(name: str, entries) -> bool:
    """peft's list rule: a full name equal to an entry, or ending with "." + entry."""
    return name in entries or any(name.endswith("." + e) for e in entries)


def _under_modules_to_save(name: str, save_names) -> bool:
    return any(name == s or name.startswith(s + ".") for s in save_names)

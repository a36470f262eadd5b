"""Random-init models of any shape, built layer by layer on the device (NF4 linears unless quant="none").

`random_nf4_model(shape)` builds the architecture on the meta device and places random tensors drawn on `device`
the way stream.py places a checkpoint's (`_place`: each linear weight quantized, then its dense copy dropped), so a
65B-shape NF4 model needs no 16-bit copy; the memory argument is stream.py's. Linear weights and embeddings
~ N(0, initializer_range) drawn in `compute_dtype` from one seeded generator on `device` (so they differ between CPU
and CUDA), biases 0, other 1-D parameters (norm scales) 1. `resolve_config` turns a shape name, a dict, a folder or
a config object into a transformers config.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lorafuse.builtin import BUILTIN_CONFIGS, match_builtin
from lorafuse.errors import ConfigError, ModelError
from lorafuse.model.stream import (
    QUANT_CHUNK_ELEMS,
    _finish,
    _place,
    _resolve_device,
    add_nf4_placeholders,
    build_meta_model,
    materialize_buffers,
)
from lorafuse.model_state import model_state


def resolve_config(spec, trust_remote_code: bool = False):
    """A transformers config from a config object, a dict with model_type, a folder/config.json or a shape name."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(spec, PretrainedConfig):
        return copy.deepcopy(spec)
    if isinstance(spec, dict):
        fields = dict(spec)
        if "model_type" not in fields:
            raise ConfigError(
                f"model shape dict has no model_type (keys: {sorted(fields)})",
                "add model_type, e.g. 'llama', so transformers knows the architecture",
            )
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(str(spec)).expanduser()
    if path.is_dir() or path.name == "config.json":
        return AutoConfig.from_pretrained(path if path.is_dir() else path.parent, trust_remote_code=trust_remote_code)
    name = match_builtin(str(spec))
    if name is None:
        raise ModelError(
            f"unknown model shape {spec!r}",
            f"use a built-in shape ({', '.join(BUILTIN_CONFIGS)}), a model "
            "folder with config.json, a transformers config object or a dict with model_type",
        )
    return resolve_config(BUILTIN_CONFIGS[name])


def _random_tensor(key: str, module, shape, dtype, device, std: float, gen) -> torch.Tensor:
    """HF-style init: N(0, std) for matrices (padding row of an embedding zeroed), 0 for biases, 1 for norm scales."""
    if len(shape) >= 2:
        t = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)
        pad = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
        if pad is not None:
            t[pad].zero_()
        return t
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.ones(shape, dtype=dtype, device=device)


def random_nf4_model(
    config_or_shape_name,
    device=None,
    compute_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    blocksize: int = 64,
    double_quant: bool = True,
    quant: str = "nf4",
    attn_implementation=None,
    chunk_elems: int = QUANT_CHUNK_ELEMS,
):
    """A random-init model of any shape, built layer by layer on `device` (NF4 linears unless quant="none").

    Each linear weight is drawn on the device in `compute_dtype`, quantized, and dropped before the next one, so
    peak memory is the final model plus one dense weight and the quantizer's chunk temporaries. Deterministic for
    a seed on a given device type. The model is frozen, in eval mode, with `model_state(model).base` set.
    """
    if quant not in ("nf4", "none"):
        raise ModelError(f"unknown quant {quant!r}", "use quant='nf4' or quant='none'")
    from lorafuse.lora.linear import NF4Linear

    device = _resolve_device(device)
    config = resolve_config(config_or_shape_name)
    model = build_meta_model(config, compute_dtype, attn_implementation)
    materialize_buffers(model, device, persistent=True)
    params = {k: tuple(p.shape) for k, p in model.named_parameters()}  # shared (tied) parameters appear once
    if quant == "nf4":
        add_nf4_placeholders(model, compute_dtype, blocksize)
    std = getattr(config, "initializer_range", None) or 0.02
    gen = torch.Generator(device=device).manual_seed(seed)
    for key, shape in params.items():
        module = model.get_submodule(key.rpartition(".")[0])
        t = _random_tensor(key, module, shape, compute_dtype, device, std, gen)
        _place(model, key, t, device, compute_dtype, double_quant, chunk_elems, owned=True)
        del t
    _finish(model)
    n_nf4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    name = config_or_shape_name if isinstance(config_or_shape_name, str) else config.model_type
    model_state(model).base = {
        "name_or_path": f"random:{name}",
        "folder": None,
        "random_init": True,
        "seed": seed,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "quant": quant,
        **({"blocksize": blocksize, "double_quant": double_quant, "nf4_linears": n_nf4} if quant == "nf4" else {}),
    }
    return model

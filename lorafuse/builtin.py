"""What lorafuse ships to run with no download: the built-in tiny model's recipe and the bundled data sets.

    builtin:tiny-llama   a random-init Llama (MODELS: 4 layers, hidden 128) with a byte-level BPE tokenizer of
                         VOCAB_SIZE tokens trained on the demo data's texts (`demo_corpus`), its merges within runs of
                         one script; lorafuse.model.load builds it on first use into its cache folder
    builtin:demo         the demo's rows (lorafuse.demo): simple sentences translated Japanese <-> English,
                         instruction/output fields (dolly-ja in the demo config)
    builtin:demo-heldout the demo's held-out rows: combinations of the same words that builtin:demo never holds
    builtin:preference   preference pairs that prefer the answer in the language the question was asked in
    builtin:preference-heldout   pairs on questions the set above does not hold (docs/dpo.md)

The data sets are package data in lorafuse/data/samples/. This module is torch-free and imports nothing of lorafuse,
so the planner reads the built-in model's shape here (`model_config`) without building it, and the loader, the data
readers and the planner agree on one recipe. The shapes of well-known models (`BUILTIN_CONFIGS`: their config.json
fields, by short name or hub id) live here too, for the planner and for random-init models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PREFIX = "builtin:"
BUILTIN_MODEL = "builtin:tiny-llama"  # model.path sentinel: the demo's model
BUILTIN_DATA = "builtin:demo"  # data.path sentinel: the demo's rows

# name: (architecture, lorafuse.model.tiny.build_tiny_model's size arguments). Sized so the demo trains in minutes on
# 2 CPU cores.
MODELS = {
    "tiny-llama": ("llama", dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2)),
}
VOCAB_SIZE = 617  # the tokenizer's BPE vocabulary: all the merges the demo texts give, hence the model's
MAX_POSITIONS = 1024  # build_tiny_model's default

SAMPLES = Path(__file__).parent / "data" / "samples"
DATA_SETS = {
    "demo": "demo.jsonl",
    "demo-heldout": "demo-heldout.jsonl",
    "preference": "preference.jsonl",
    "preference-heldout": "preference-heldout.jsonl",
}


def data_path(name: str) -> Path | None:
    """The file of bundled data set `name` ("demo", or "builtin:demo"), or None when there is no such set."""
    name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    return SAMPLES / DATA_SETS[name] if name in DATA_SETS else None


def demo_corpus() -> list[str]:
    """Texts of the demo data (every field of every row), so the tiny tokenizer splits them into few tokens."""
    path, texts = data_path("demo"), []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(str(v) for v in json.loads(line).values())
    return texts


def model_config(name: str) -> dict:
    """The config.json fields of built-in model `name` ("tiny-llama") that give its shape."""
    arch, size = MODELS[name]
    return {
        "model_type": arch,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": size["hidden_size"],
        "intermediate_size": size["intermediate_size"],
        "num_hidden_layers": size["num_layers"],
        "num_attention_heads": size["num_heads"],
        "num_key_value_heads": size["num_kv_heads"],
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
    }


# ------------------------------------------------------------------------------------------ shapes of known models
# The config.json fields the planner reads (lorafuse.plan.shapes) and random-init models are built from
# (lorafuse.model.random_init), as the hub publishes them, by short name; `match_builtin` maps hub ids to them.


def _llama(V, D, F, L, H, Hkv, max_pos, **extra) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
    }


def _qwen25(D, F, L, H, Hkv, V=152064, tied=False) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    }


_L3 = {"rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001}
BUILTIN_CONFIGS: dict[str, dict] = {
    # The tiny shape matches lorafuse.model.tiny.build_tiny_model's defaults (smoke tests, CPU bench).
    "tiny": _llama(512, 64, 128, 2, 4, 2, 1024),
    "llama-7b": _llama(32000, 4096, 11008, 32, 32, 32, 2048, rms_norm_eps=1e-6),
    "llama-13b": _llama(32000, 5120, 13824, 40, 40, 40, 2048, rms_norm_eps=1e-6),
    "llama-65b": _llama(32000, 8192, 22016, 80, 64, 64, 2048),
    "tinyllama-1.1b": _llama(32000, 2048, 5632, 22, 32, 4, 2048),
    "llama3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, 131072, tie_word_embeddings=True, head_dim=64, **_L3),
    "llama3.2-3b": _llama(128256, 3072, 8192, 28, 24, 8, 131072, tie_word_embeddings=True, head_dim=128, **_L3),
    "llama2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, **_L3),
    "llama3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192, **_L3),
    "mistral-7b": {**_llama(32000, 4096, 14336, 32, 32, 8, 32768), "model_type": "mistral"},
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, V=151936, tied=True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, V=151936, tied=True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, V=151936, tied=True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8),
}

# Hub ids (lower case, organisation dropped, variant suffixes removed) -> built-in name.
_HUB_ALIASES = {
    "llama-2-7b": "llama2-7b",
    "llama-2-13b": "llama2-13b",
    "llama-2-70b": "llama2-70b",
    "meta-llama-3-8b": "llama3-8b",
    "llama-3-8b": "llama3-8b",
    "meta-llama-3.1-8b": "llama3-8b",
    "llama-3.1-8b": "llama3-8b",
    "meta-llama-3-70b": "llama3-70b",
    "llama-3-70b": "llama3-70b",
    "meta-llama-3.1-70b": "llama3-70b",
    "llama-3.1-70b": "llama3-70b",
    "llama-3.3-70b": "llama3-70b",
    "llama-7b": "llama-7b",
    "llama-13b": "llama-13b",
    "llama-65b": "llama-65b",
    "llama-3.2-1b": "llama3.2-1b",
    "llama-3.2-3b": "llama3.2-3b",
    "tinyllama-1.1b-chat-v1.0": "tinyllama-1.1b",
    "tinyllama-1.1b-intermediate-step-1431k-3t": "tinyllama-1.1b",
    "mistral-7b-v0.1": "mistral-7b",
    "mistral-7b-v0.3": "mistral-7b",
    "mistral-7b": "mistral-7b",
    **{f"qwen2.5-{s}": f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
}
_VARIANT = re.compile(r"(-(hf|chat|instruct|it|base|bnb-4bit|unsloth-bnb-4bit))+$")


def match_builtin(name_or_id: str) -> str | None:
    """The built-in shape a short name or hub id stands for, or None."""
    key = name_or_id.strip().lower()
    if key in BUILTIN_CONFIGS:
        return key
    key = _VARIANT.sub("", key.rsplit("/", 1)[-1])
    if key in BUILTIN_CONFIGS:
        return key
    return _HUB_ALIASES.get(key)

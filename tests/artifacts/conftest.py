"""Export fixtures: tiny bases (Llama, Qwen2, Qwen3) with trained adapters (tiny_trained.py), built once per session,
their float32 merges (the reference weights) and their GGUF exports, each made on first use."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_trained import Trained, fit_adapter, tiny_base

_CASES = {  # name: (arch, training quant, extra LoRA settings)
    "llama-nf4": ("llama", "nf4", {}),
    "llama": ("llama", "none", {}),
    "qwen2-mts": ("qwen2", "none", {"modules_to_save": ["lm_head"]}),  # a whole trained head, as trained rows are
    "qwen3": ("qwen3", "none", {}),
}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_tokenizer):
    """trained(name) -> Trained, built on first use and kept for the session."""
    cache: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in cache:
            arch, quant, lora = _CASES[name]
            root = tmp_path_factory.mktemp(name)
            base = tiny_base(root / "base", arch, tiny_tokenizer)
            cache[name] = Trained(base, fit_adapter(base, root / "adapter", quant, **lora), quant, arch)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def merged_fp32(tmp_path_factory, trained):
    """merged_fp32(name) -> the folder lorafuse.merge writes in float32 (the reference weights), once per case."""
    from lorafuse.artifacts.merge import merge

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            t = trained(name)
            cache[name] = merge(
                t.base, t.adapter, tmp_path_factory.mktemp(f"{name}-merged") / "m", dtype="float32"
            ).path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained):
    """exported(name, quant) -> the GGUF file of the merged model, written once per (case, type)."""
    from lorafuse.artifacts.export import export

    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, quant: str) -> Path:
        if (name, quant) not in cache:
            t = trained(name)
            out = tmp_path_factory.mktemp(f"{name}-{quant}") / f"{name}-{quant}.gguf"
            cache[name, quant] = export(t.base, t.adapter, out, quant=quant).path
        return cache[name, quant]

    return get

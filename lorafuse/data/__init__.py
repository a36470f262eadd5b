"""Data: read instruction data, render it with a template, tokenize with loss masks, batch (padded or packed).

Public names (imported lazily, so `import lorafuse.data` stays cheap):
    build_datasets(data_cfg, tokenizer, seed=42, cache_dir=None) -> (train, val | None, DataStats)
    cache_dir_for(run_cfg) -> data.cache_dir or <output.dir>/.cache
    Batcher(dataset, micro_batch_size, pad_id, packing, max_length, seed, shuffle)
    model_inputs(batch, attn_implementation, dtype, device) -> forward kwargs for a transformers model
    demo_data_path() -> Path of the bundled bilingual sample
    plain_prompt(fmt, instruction, input="", system_prompt=None) -> the prompt text the plain template trains on
"""

from __future__ import annotations

_EXPORTS = {
    "build_datasets": "lorafuse.data.build",
    "TokenizedDataset": "lorafuse.data.build",
    "cache_dir_for": "lorafuse.data.build",
    "Batcher": "lorafuse.data.collate",
    "model_inputs": "lorafuse.data.collate",
    "DataStats": "lorafuse.data.stats",
    "demo_data_path": "lorafuse.data.readers",
    "plain_prompt": "lorafuse.data.formats",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lorafuse.data' has no attribute '{name}'")

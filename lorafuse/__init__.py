"""lorafuse: fast LoRA and QLoRA fine-tuning of causal language models.

The Python API follows the familiar flow::

    model, tokenizer = lorafuse.load_model("meta-llama/Llama-2-7b-hf", quant="nf4")
    lorafuse.apply_lora(model, r=16, alpha=32, dropout=0.05, targets="all-linear")
    lorafuse.print_trainable_parameters(model)
    lorafuse.train(model, tokenizer, "data.jsonl", format="dolly-ja", output_dir="out")
    lorafuse.save_adapter(model, "out/adapter")

Names are imported lazily so `import lorafuse` stays fast and the CLI starts quickly.
"""

from __future__ import annotations

import importlib

from lorafuse.version import __version__

_EXPORTS = {
    "load_model": "lorafuse.model.load",
    "apply_lora": "lorafuse.model.inject",
    "print_trainable_parameters": "lorafuse.model.inject",
    "trainable_parameters": "lorafuse.model.inject",
    "save_adapter": "lorafuse.artifacts.adapter_io",
    "load_adapter": "lorafuse.artifacts.adapter_load",
    "merge": "lorafuse.artifacts.merge",
    "export": "lorafuse.artifacts.export",
    "generate": "lorafuse.infer.generate",
    "train": "lorafuse.job",
    "load_config": "lorafuse.config",
    "RunConfig": "lorafuse.config",
    "LorafuseError": "lorafuse.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

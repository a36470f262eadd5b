"""Checks of a run's inputs before any model weights are read: a bad data file fails in a second, not after the
minutes a large model takes to load.

`check_inputs(cfg, out)` first reads the local data files and renders their rows without a tokenizer (the files
exist and parse, each row has the fields of data.format), then loads the tokenizer alone (its files are small), which
also checks the model source (folder or hub cache, config.json, remote code), then builds the data sets exactly as
training will: at least one row has a trained token that is not the end-of-text token, the validation split
leaves rows to train on. The tokenized rows land in the tokenization cache,
so the training step reads them back instead of tokenizing twice. Last, the attention backend is checked.
"""

from __future__ import annotations

from pathlib import Path


def check_inputs(cfg, out: Path) -> None:
    """Raise the LorafuseError of the first bad input (module docstring); return None when all are usable."""
    from lorafuse.data import build_datasets
    from lorafuse.data.build import check_rows
    from lorafuse.model.checks import check_attn_implementation, check_remote_code
    from lorafuse.model.load import load_tokenizer, resolve_model_path

    check_rows(cfg.data)  # files and fields first: no tokenizer, no transformers import
    mc = cfg.model
    folder = resolve_model_path(mc.path)
    check_remote_code(folder, mc.trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code=mc.trust_remote_code)
    cache_dir = cfg.data.cache_dir or str(Path(out) / ".cache")
    build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, cache_dir=cache_dir)
    check_attn_implementation(mc.attn_implementation)

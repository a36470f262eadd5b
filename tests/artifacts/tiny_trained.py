"""Tiny trained adapters for the export tests (imported by conftest.py and the tests).

An adapter is trained (plain Adam on the LoRA weights, full batch) until the model has memorised three short
conversations, so that greedy decoding has clear winners and ends each answer with the end-of-turn token: llama.cpp
must then reproduce the answers token for token and stop where the trained model stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CONVERSATIONS = [
    [
        {"role": "user", "content": "Name three primary colors."},
        {"role": "assistant", "content": "Red, blue and yellow."},
    ],
    [{"role": "user", "content": "日本の首都はどこですか?"}, {"role": "assistant", "content": "東京です。"}],
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
]
FIT_STEPS = 60


@dataclass(frozen=True)
class Trained:
    base: Path
    adapter: Path
    quant: str  # how the base was loaded in training: "nf4" or "none"
    arch: str


def fit_adapter(base: Path, adapter: Path, quant: str, seed: int = 0, **lora) -> Path:
    """Train a LoRA adapter on CONVERSATIONS (whole sequences) and save it with lorafuse's save_adapter."""
    import lorafuse

    model, tok = lorafuse.load_model(str(base), quant=quant, compute_dtype="float32", device="cpu")
    torch.manual_seed(seed)
    lorafuse.apply_lora(model, **({"r": 8, "alpha": 16, "targets": "all-linear"} | lora))
    seqs = [
        torch.tensor([tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]]) for c in CONVERSATIONS
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(FIT_STEPS):
        loss = sum(model(input_ids=s, labels=s).loss for s in seqs) / len(seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lorafuse.save_adapter(model.eval(), adapter, tokenizer=tok)
    return adapter


def tiny_base(folder: Path, arch: str, tokenizer, rope: dict | None = None) -> Path:
    """A saved tiny random-init model; `rope` updates config.json's rope_parameters (e.g. a llama3 scaling)."""
    import json

    from lorafuse.model.tiny import build_tiny_model

    build_tiny_model(arch, tokenizer=tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if rope:
        config = json.loads((folder / "config.json").read_text())
        config["rope_parameters"] = config["rope_parameters"] | rope
        (folder / "config.json").write_text(json.dumps(config))
    return folder

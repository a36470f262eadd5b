"""Every example config loads; the seed recipe keeps the seed's values; each opens with its run command."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL = sorted(EXAMPLES.rglob("*.yaml")) + sorted(EXAMPLES.rglob("*.yml"))


def test_the_three_examples_exist():
    names = {p.name for p in ALL}
    assert {"llama2-7b-dolly-ja-qlora.yaml", "tiny-cpu.yaml", "llama3-8b-chat-lora.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_loads_and_opens_with_its_run_command(path):
    load_config(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    rel = path.relative_to(EXAMPLES.parent).as_posix()
    assert first.startswith("#") and f"lorafuse train {rel}" in first


def test_seed_recipe_values():
    path = EXAMPLES / "llama2-7b-dolly-ja-qlora.yaml"
    cfg = load_config(path)
    assert cfg.model.path == "meta-llama/Llama-2-7b-hf"
    assert (cfg.model.quant, cfg.model.double_quant, cfg.model.compute_dtype) == ("nf4", True, "bfloat16")
    assert "float16 on a T4" in path.read_text(encoding="utf-8")
    assert cfg.data.path == "kunishou/databricks-dolly-15k-ja"
    assert (cfg.data.format, cfg.data.max_length) == ("dolly-ja", 512)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.train.epochs, cfg.train.micro_batch_size, cfg.train.grad_accum) == (3, 4, 4)
    assert (cfg.train.lr, cfg.train.optimizer) == (2e-4, "paged_adamw_8bit")
    assert cfg.train.save_every is None  # null = a checkpoint at the end of each epoch (save_strategy="epoch")


def test_tiny_cpu_example_needs_no_download():
    cfg = load_config(EXAMPLES / "tiny-cpu.yaml")
    assert cfg.model.path == "builtin:tiny-llama" and cfg.data.path == "builtin:demo"
    assert cfg.train.device == "cpu" and cfg.train.optimizer == "adamw" and cfg.model.quant == "none"


def test_chat_example_is_16bit_lora_on_messages():
    cfg = load_config(EXAMPLES / "llama3-8b-chat-lora.yaml")
    assert (cfg.data.format, cfg.model.quant, cfg.model.compute_dtype) == ("messages", "none", "bfloat16")

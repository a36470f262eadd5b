"""A tiny QLoRA run whose chat template's tokens have zero rows (as Llama-3 base's do): by default the run reports
them, trains exactly those rows in both tables (the loss falls, the rows move) and saves them in peft's format;
lora.train_untrained_tokens=off reports them and leaves them alone."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lorafuse.config import validate_config
from lorafuse.job import run
from lorafuse.model.tiny import build_tiny_model

TEMPLATE_IDS = [4, 5]  # <|im_start|>, <|im_end|> of the tiny tokenizer


@pytest.fixture(scope="module")
def zeroed_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("zeroed-template-rows")
    model = build_tiny_model("llama", tokenizer=tiny_tokenizer)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            table[TEMPLATE_IDS] = 0
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    rows = [
        {"messages": [{"role": "user", "content": f"count to {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(1, 25)
    ]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _run(folder, out, mode, dtype="float32", init="sample", **train):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear", "train_untrained_tokens": mode}
    cfg = validate_config(
        {
            "model": {"path": str(folder), "quant": "nf4", "compute_dtype": dtype},
            "lora": {**lora, "token_row_init": init},
            "data": {"path": str(folder / "chat.jsonl"), "format": "messages", "max_length": 48},
            "train": {
                "max_steps": 12,
                "micro_batch_size": 8,
                "grad_accum": 1,
                "lr": 1e-2,
                "warmup_steps": 0,
                "optimizer": "adamw",
                "gradient_checkpointing": False,
                "device": "cpu",
                **train,
            },
            "output": {"dir": str(out)},
        }
    )
    buf = io.StringIO()
    result = run(cfg, console=Console(file=buf, width=300))
    return result, buf.getvalue()


def test_zeroed_template_rows_are_reported_and_trained(zeroed_dir, tmp_path):
    result, text = _run(zeroed_dir, tmp_path / "auto", "auto", init="mean")
    assert "untrained token rows: 2 of the" in text and "started at the mean of the trained rows" in text
    assert "'<|im_start|>' (id 4): embedding all zero, head all zero" in text
    assert result.last_loss < result.first_loss
    adapter = tmp_path / "auto" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": TEMPLATE_IDS, "lm_head": TEMPLATE_IDS}
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    for table in ("model.embed_tokens", "lm_head"):
        rows = saved[f"base_model.model.{table}.token_adapter.trainable_tokens_delta"]
        assert rows.shape == (2, 64)
        # started at one vector (the mean of the trained rows); training moved each row its own way
        assert (rows[0] - rows[1]).norm() > 0.05 * rows.norm(dim=1).min() > 0, table


def test_by_default_the_rows_start_as_samples_drawn_from_the_run_seed(zeroed_dir, tmp_path):
    starts = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _, text = _run(zeroed_dir, tmp_path / name, "auto", max_steps=1, lr=1e-12, seed=seed)
        assert "the embedding rows each drawn around the trained rows" in text
        saved = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        starts.append(saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"])
    assert (starts[0][0] - starts[0][1]).norm() > 0.1 * starts[0].norm(dim=1).min()  # two different rows
    assert torch.allclose(starts[0], starts[1], atol=1e-9) and not torch.allclose(starts[0], starts[2], atol=1e-3)


def test_off_leaves_them_alone(zeroed_dir, tmp_path):
    result, text = _run(zeroed_dir, tmp_path / "off", "off")
    assert "untrained token rows: 2 of the" in text and "lora.train_untrained_tokens=off" in text
    adapter = tmp_path / "off" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"] is None
    assert not any("token_adapter" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    assert result.last_loss < result.first_loss


@pytest.mark.gpu
def test_rows_train_on_the_fast_path_with_cuda_graphs(zeroed_dir, tmp_path):
    """The fused loss hands the head rows their gradient and the embedding hook replays inside the CUDA graphs."""
    result, text = _run(
        zeroed_dir,
        tmp_path / "gpu",
        "auto",
        "bfloat16",
        device="cuda",
        fast_path="on",
        cuda_graphs="auto",
        max_steps=16,
    )
    assert "untrained token rows: 2 of the" in text and result.last_loss < result.first_loss
    saved = load_file(str(tmp_path / "gpu" / "adapter" / "adapter_model.safetensors"))
    for table in ("model.embed_tokens", "lm_head"):
        rows = saved[f"base_model.model.{table}.token_adapter.trainable_tokens_delta"]
        assert torch.isfinite(rows).all() and (rows[0] - rows[1]).norm() > 0.05 * rows.norm(dim=1).min() > 0, table

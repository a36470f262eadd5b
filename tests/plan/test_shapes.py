"""Parameter counts of the planner's shapes, checked against formulas written here and real tiny models."""

from __future__ import annotations

import json

import pytest

from lorafuse.errors import ModelError
from lorafuse.plan.memory import estimate, weight_bytes
from lorafuse.plan.shapes import ModelShape, builtin_names, load_shape
from lorafuse.plan.workload import Workload

PROJ7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_params(V, D, F, L, Hkv_ratio=1):
    """Llama: per layer q,o (D x D), k,v (D/ratio x D), gate/up/down (D x F), two norms; embed + head + final norm."""
    kv = D // Hkv_ratio
    per_layer = 2 * D * D + 2 * kv * D + 3 * D * F + 2 * D
    return L * per_layer + 2 * V * D + D


def test_llama2_7b_matches_hf_count():
    expected = llama_params(V=32000, D=4096, F=11008, L=32)
    assert expected == 6_738_415_616  # HF's count for meta-llama/Llama-2-7b-hf
    assert load_shape("meta-llama/Llama-2-7b-hf").total_params == expected


def test_llama3_8b_gqa_count():
    expected = llama_params(V=128256, D=4096, F=14336, L=32, Hkv_ratio=4)
    assert expected == 8_030_261_248  # HF's count for meta-llama/Meta-Llama-3-8B
    assert load_shape("meta-llama/Meta-Llama-3-8B-Instruct").total_params == expected


def test_lora_trainable_counts_match_the_seed():
    D, F, L = 4096, 11008, 32
    shape = load_shape("llama2-7b")

    def trainable(r, targets):
        return estimate(Workload(shape, r=r, targets=targets)).trainable

    # r (in + out) per adapted linear, per layer.
    all7 = L * 16 * (4 * (D + D) + 2 * (D + F) + (F + D))
    assert all7 == 39_976_960
    assert trainable(16, PROJ7) == all7
    assert trainable(16, ("q_proj", "v_proj")) == L * 16 * 2 * (D + D) == 8_388_608
    # The seed prints "trainable params: 4,194,304 || all params: 6,742,609,920" for r=8 on q and v.
    qv8 = trainable(8, ("q_proj", "v_proj"))
    assert qv8 == 4_194_304
    assert shape.total_params + qv8 == 6_742_609_920


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-7B-Instruct", "unsloth/llama-2-7b-bnb-4bit", "huggyllama/llama-65b"])
def test_hub_ids_map_to_builtins_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_shape(name).name in builtin_names()


def test_unknown_model_offline_lists_builtins(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        load_shape("someone/not-a-model-7b")
    assert "llama2-7b" in err.value.fix and "qwen2.5-72b" in err.value.fix


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_shape(str(tmp_path))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_local_folder_matches_real_model(fixture, request):
    """Count and bytes from config.json alone equal the real model's parameters (Qwen2: q/k/v biases)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    shape = load_shape(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    w = Workload(shape, method="lora", compute_bytes=4)
    assert sum(weight_bytes(w).values()) == sum(p.nbytes for p in model.parameters())
    if fixture == "tiny_qwen2_dir":
        assert shape.bias_params == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")) > 0


def test_tied_embeddings_count_once(tmp_path):
    from lorafuse.model.tiny import build_tiny_model

    model = build_tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    shape = ModelShape.from_config(json.loads((tmp_path / "config.json").read_text()))
    assert shape.head_params == 0
    assert shape.total_params == sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights

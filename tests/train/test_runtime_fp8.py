"""train.fp8: from the YAML to the fused linears, with a clear error where the card or the dtype cannot run it."""

from __future__ import annotations

import pytest
import torch

from lorafuse.config import load_config
from lorafuse.errors import LorafuseError
from lorafuse.kernels import fp8
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.train.runtime import prepare_model


def _model(dtype=torch.float32):
    model = build_tiny_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2).to(dtype)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    return model


def test_fp8_is_off_by_default_and_read_from_the_yaml(tmp_path):
    assert load_config(None).train.fp8 is False
    (tmp_path / "c.yaml").write_text(
        'model: {path: "builtin:tiny-llama"}\ndata: {path: "builtin:demo"}\ntrain:\n  fp8: true\n'
    )
    assert load_config(str(tmp_path / "c.yaml")).train.fp8 is True


def test_fp8_on_a_cpu_model_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(fp8, "ENABLED", False)
    with pytest.raises(LorafuseError) as err:
        prepare_model(_model(torch.bfloat16), False, note=lambda *_: None, fp8=True)
    text = str(err.value)
    assert "train.fp8" in text and "NVIDIA GPU" in text and "train.fp8: false" in text
    assert fp8.ENABLED is False


def test_fp8_needs_bf16_compute(monkeypatch):
    monkeypatch.setattr(fp8, "supported", lambda device: "")  # a card that could
    with pytest.raises(LorafuseError, match="bf16 compute.*float32"):
        prepare_model(_model(torch.float32), False, note=lambda *_: None, fp8=True)


def test_fp8_turns_on_for_a_run_and_off_for_the_next(monkeypatch):
    monkeypatch.setattr(fp8, "supported", lambda device: "")
    monkeypatch.setattr(fp8, "ENABLED", False)
    notes = []
    prepare_model(_model(torch.bfloat16), False, note=notes.append, fp8=True)
    assert fp8.ENABLED is True and any("FP8" in n for n in notes)
    prepare_model(_model(torch.bfloat16), False, note=notes.append)
    assert fp8.ENABLED is fp8.ENV_ENABLED

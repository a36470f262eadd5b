"""adapters_disabled: the base model from the same weights, on the plain path and the fast path; refusals."""

from __future__ import annotations

import pytest
import torch

from lorafuse.accel.fast_path import apply_fast_path
from lorafuse.errors import LorafuseError
from lorafuse.lora.disable import adapters_disabled
from lorafuse.lora.linear import LoRALinear
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(dropout=0.0, **kwargs):
    model = apply_lora(
        build_tiny_model(vocab_size=96, seed=1), r=4, alpha=8, dropout=dropout, targets=TARGETS, **kwargs
    )
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zero_b_logits(model, ids):
    """The same model with every B set to zero (restored after): the base function on the same ops."""
    saved = {m: m.lora_B.weight.data.clone() for m in model.modules() if isinstance(m, LoRALinear)}
    for m in saved:
        m.lora_B.weight.data.zero_()
    try:
        return _logits(model, ids)
    finally:
        for m, b in saved.items():
            m.lora_B.weight.data = b


@pytest.mark.parametrize("fast", [False, True])
def test_disabled_adapter_is_the_base_model(fast):
    model = _lora_model(dropout=0.1).train()  # dropout on: nothing of the LoRA branch may run while off
    if fast:
        assert apply_fast_path(model, use_reference=True)[0]  # the fused ops' PyTorch references on the CPU
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    adapted, base = _logits(model, ids), _zero_b_logits(model, ids)
    model.train()
    with adapters_disabled(model):
        off = _logits(model, ids)
    assert torch.equal(off, base)  # bit for bit: no LoRA term is added at all
    assert (adapted - base).abs().max() > 1e-3  # the adapter does change the output
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoRALinear))
    model.eval()
    assert torch.equal(_logits(model, ids), adapted)  # switched back on


def test_state_is_restored_when_the_block_raises():
    model = _lora_model()
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
        raise RuntimeError("boom")
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoRALinear))


def test_refused_when_a_module_is_trained_in_place():
    model = _lora_model(modules_to_save=["lm_head"])
    with pytest.raises(LorafuseError, match="modules_to_save") as e, adapters_disabled(model):
        pass
    assert "dpo_reference=precomputed" in e.value.fix


def test_refused_when_merged():
    model = _lora_model()
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(LorafuseError, match="merged"), adapters_disabled(model):
        pass

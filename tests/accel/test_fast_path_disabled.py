"""The fused Triton ops (interpreted on a CPU) honour a switched-off adapter: DPO's live reference on the fast path."""

from __future__ import annotations

import pytest
import torch

from lorafuse.accel.fast_path import apply_fast_path
from lorafuse.lora.disable import adapters_disabled
from lorafuse.lora.linear import LoRALinear
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model


@pytest.mark.slow
def test_kernel_fast_path_with_the_adapter_off_is_the_base(device):
    if device.type == "cuda":
        pytest.skip("tiny fp32 model test; the GPU runs the same ops in the gpu-marked kernel tests")
    model = build_tiny_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=1)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets="all-linear")
    g = torch.Generator().manual_seed(1)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
    fast, reason = apply_fast_path(model)
    assert fast is not None and fast.ops.name == "triton", reason
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    model.train()  # dropout on: the LoRA branch, masks included, must not run while the adapter is off
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        saved = [m.lora_B.weight.data.clone() for m in layers]
        for m in layers:
            m.lora_B.weight.data.zero_()
        model.eval()  # no dropout: with B = 0 the LoRA term is exactly zero
        base = model(input_ids=ids).logits
    for m, b in zip(layers, saved):
        m.lora_B.weight.data = b
    assert torch.equal(off, base) and (adapted - base).abs().max() > 1e-3

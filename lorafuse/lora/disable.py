"""Switch a model's LoRA adapter off for a block: the base model, from the same weights, without a copy.

    with adapters_disabled(model):      # every LoRALinear computes y = x W^T + b (its base layer alone)
        ref = model(**inputs)

DPO's reference model is the model before training. For a LoRA run that starts from a fresh adapter (B = 0) it is
the base, so the reference costs no memory: the same module tree runs once more with the adapter off. The switch
is `LoRALinear.disabled`; `LoRALinear.forward` and the fast path's `linear_spec` (the fused kernels' operands) both
read it, so it holds on either path. Dropout masks are not drawn while it is off (the LoRA branch does not run).

Trainable token rows (lora/token_rows.py) are switched off with it: the tables' own rows, as peft's
`disable_adapter` gives them. Refused (LorafuseError) where "off" cannot mean the base model: modules trained in
full in place (`lora.modules_to_save`: lorafuse keeps no frozen original to fall back on) and adapters merged into
the base weight. The previous state of every layer is restored on exit, also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from lorafuse.errors import LorafuseError
from lorafuse.lora import token_rows
from lorafuse.lora.linear import LoRALinear
from lorafuse.model_state import model_state


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRALinear of `model` is its base layer alone; see the module docstring."""
    trained = (model_state(model).lora or {}).get("trained_module_names") or []
    if trained:
        raise LorafuseError(
            f"the adapter cannot be switched off to give the base model: lora.modules_to_save trains {trained} "
            "in place, so their original weights are gone",
            "set train.dpo_reference=precomputed (reference log-probs computed once before training), or train "
            "without lora.modules_to_save",
        )
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    merged = [m for m in layers if m.merged]
    if merged:
        raise LorafuseError(
            f"{len(merged)} LoRA layers are merged into their base weights, so switching the adapter off "
            "would still leave it in",
            "unmerge the adapter (LoRALinear.unmerge) before training against the base model",
        )
    before = [m.disabled for m in layers]
    rows = token_rows.state(model)
    rows_before = rows is not None and rows.disabled
    for m in layers:
        m.disabled = True
    if rows is not None:
        rows.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state
        if rows is not None:
            rows.disabled = rows_before

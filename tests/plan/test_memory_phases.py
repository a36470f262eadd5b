"""The planner's accounting of the fused fast path and of the gradients alive during a step, on real models.

The fused kernels run in Triton's CPU interpreter here (in a subprocess: TRITON_INTERPRET=1 must be set before
lorafuse.kernels is imported, and the interpreter's bf16 is unreliable, so the model is fp16: c = 2 bytes either way).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from lorafuse.plan.activations import layer_saved_bytes, layer_saved_constant_bytes
from lorafuse.plan.memory import gradient_bytes
from lorafuse.plan.shapes import ModelShape
from lorafuse.plan.workload import Workload

_FUSED_SAVED = r"""
import json, sys
import torch
from lorafuse.kernels import _runtime
from lorafuse.accel.fast_path import apply_fast_path
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model

torch.set_num_threads(1)
batch, seq = 2, 8

def saved(num_layers, padded):
    model = build_tiny_model("llama", vocab_size=512, num_layers=num_layers).to(torch.float16)
    model.config._attn_implementation = "sdpa"
    apply_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear")
    model.train()
    ids = torch.randint(4, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -3:] = 0
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):  # every saved tensor once per storage: a tensor two ops save is counted once
        if t.numel() >= batch * seq and t.untyped_storage().data_ptr() not in frozen:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with _runtime.cpu_kernels():
        fast, reason = apply_fast_path(model)
        assert fast is not None, reason
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, attention_mask=mask if padded else None)
    return sum(seen.values()), model.config.to_dict()

# Layer 0's input (the embeddings) needs no gradient, so its norm saves nothing: difference layers 3 and 2.
out = {}
for padded in (False, True):
    three, cfg = saved(3, padded)
    out[str(padded)] = three - saved(2, padded)[0]
print(json.dumps({"layer_bytes": out, "config": cfg, "tokens": batch * seq}))
"""


@pytest.mark.slow
def test_fused_layer_saves_what_the_planner_counts():
    """One more decoder layer under the fast path adds exactly layer_saved_bytes(kernels="fused") per token plus
    layer_saved_constant_bytes: the attention output is saved once (SDPA's output IS o_proj's input), the norms
    keep x + 1/rms, the MLP x, e, g and S, and each projection its casts of A and s B."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", _FUSED_SAVED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    w = Workload(
        ModelShape.from_config(got["config"]),
        method="lora",
        micro_batch=2,
        seq=8,
        r=8,
        dropout=0.0,
        compute_bytes=2,
        lora_bytes=4,
        checkpointing="off",
        kernels="fused",
        loss="fused",
    )
    fixed = layer_saved_constant_bytes(w)
    assert fixed > 0
    assert got["layer_bytes"] == {
        str(p): layer_saved_bytes(w.with_(padded=p)) * got["tokens"] + fixed for p in (False, True)
    }


def _grad_bytes(model) -> int:
    return sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_alive_after_the_top_layer_backward(checkpointing):
    """With .grad set to None between steps, when the top layer's backward is done only the head's and that layer's
    gradients exist (planner: gradient_bytes(w)["backward"]); on the second micro-step of a window, all of them."""
    from lorafuse import accel
    from lorafuse.model.inject import apply_lora
    from lorafuse.model.tiny import build_tiny_model
    from lorafuse.options import Options

    model = build_tiny_model("llama", vocab_size=512, num_layers=3)
    apply_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear", modules_to_save=["lm_head"])
    if checkpointing:
        # the loop's own (non-reentrant) checkpointing
        accel.prepare(model, Options(fast_path="off", gradient_checkpointing=True), note=lambda text: None)
    model.train()
    seen = []

    def watch(module, args):  # the gradient w.r.t. the top layer's INPUT exists once its backward has run
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: seen.append(_grad_bytes(model)))

    model.model.layers[-1].register_forward_pre_hook(watch)
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two micro-steps of one window: gradients accumulate
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    shape = ModelShape.from_config(model.config.to_dict())
    w = Workload(
        shape,
        method="lora",
        r=8,
        targets=tuple(t.name for t in shape.linears()),
        modules_to_save=("lm_head",),
        lora_bytes=4,
        compute_bytes=4,
        grad_accum=1,
    )
    assert seen[0] == gradient_bytes(w)["backward"]
    assert seen[0] < seen[1] == gradient_bytes(w.with_(grad_accum=2))["backward"] == _grad_bytes(model)

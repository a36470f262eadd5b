"""train.uncheckpointed_layers: the last N decoder layers keep their activations instead of recomputing them."""

from __future__ import annotations

import torch
from workloads import lean_workload

from lorafuse import accel
from lorafuse.accel.host_tables import simple_head
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.options import Options
from lorafuse.plan import speed
from lorafuse.plan.activations import layer_saved_bytes, layer_saved_constant_bytes
from lorafuse.plan.memory import GIB, estimate
from lorafuse.plan.shapes import builtin_shape
from lorafuse.training.loss import lm_loss_sum


def _model():
    model = build_tiny_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=4)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    for name, p in model.named_parameters():  # B starts at zero: make every LoRA gradient count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _step(kept: int):
    torch.manual_seed(0)
    model, notes = _model(), []
    accel.prepare(
        model, Options(fast_path="off", gradient_checkpointing=True, uncheckpointed_layers=kept), note=notes.append
    )
    calls = [0] * 4
    for i, layer in enumerate(model.base_model.layers):  # counted in forward itself: the recompute runs it again

        def counted(*args, forward=layer.mlp.forward, i=i, **kwargs):  # (module hooks do not fire there)
            calls[i] += 1
            return forward(*args, **kwargs)

        layer.mlp.forward = counted
    model.train()
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = lm_loss_sum(model, {"input_ids": ids, "labels": ids}, simple_head(model))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, calls, notes


def test_kept_layers_skip_their_recompute_and_train_the_same():
    loss0, grads0, calls0, _ = _step(0)
    loss2, grads2, calls2, notes = _step(2)
    assert calls0 == [2, 2, 2, 2]  # every layer recomputed in the backward
    assert calls2 == [2, 2, 1, 1]  # the last two ran once: their activations were kept
    assert "the last 2 decoder layers save their activations" in notes[-1]
    assert loss2 == loss0
    for name, g in grads0.items():
        torch.testing.assert_close(grads2[name], g, rtol=0, atol=0)
    _, _, calls_all, _ = _step(10)  # more than the model has: all of them
    assert calls_all == [1, 1, 1, 1]


def test_planner_prices_each_kept_layer():
    """Memory: a kept layer holds its whole saved set (with its LoRA casts) instead of its input; time: one pass
    fewer."""
    s = builtin_shape("llama2-7b")
    w = lean_workload("llama2-7b", 4, 512, checkpointing="on")
    per_layer = layer_saved_bytes(w) * w.tokens + layer_saved_constant_bytes(w)
    card = speed.card_by_name("H100")
    previous = None
    for k in (0, 4, 8):
        est = estimate(w.with_(uncheckpointed=k))
        grown = est.components["activations"] - estimate(w).components["activations"]
        assert grown == k * (per_layer - 2 * s.hidden_size * w.tokens)
        t = speed.step_seconds(w.with_(uncheckpointed=k), card)
        assert previous is None or t < previous
        previous = t
    assert estimate(w.with_(uncheckpointed=99)).peak_alloc == estimate(w.with_(uncheckpointed=32)).peak_alloc
    off = estimate(w.with_(checkpointing="off", uncheckpointed=8))
    assert off.peak_alloc == estimate(w.with_(checkpointing="off")).peak_alloc  # nothing to take out
    assert estimate(w.with_(uncheckpointed=8)).peak_alloc - estimate(w).peak_alloc > 1.4 * GIB


def test_config_key():
    from lorafuse.config import load_config

    assert load_config(None).train.uncheckpointed_layers == 0
    assert load_config(None, ["train.uncheckpointed_layers=6"]).train.uncheckpointed_layers == 6
    assert load_config(None, ["train.uncheckpointed_layers=6"]).options().uncheckpointed_layers == 6


def test_offload_counts_only_the_layers_it_checkpoints():
    model, notes = _model(), []
    accel.prepare(
        model, Options(fast_path="off", gradient_checkpointing="offload", uncheckpointed_layers=1), note=notes.append
    )
    assert notes[-2:] == [
        "the last 1 decoder layers save their activations (no recompute in backward)",
        "activation offload: the inputs of 3 checkpointed layers wait in pinned CPU memory",
    ]

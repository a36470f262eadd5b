"""Activation offload (train.gradient_checkpointing: offload): the same gradients as plain checkpointing."""

from __future__ import annotations

import pytest
import torch

import lorafuse
from lorafuse import accel
from lorafuse.accel.offload import offload_checkpoint
from lorafuse.config import load_config
from lorafuse.options import Options


def _grads(model_dir, checkpointing, dropout=0.0, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model, _ = lorafuse.load_model(str(model_dir), quant="none", compute_dtype="float32", device=device)
    lorafuse.apply_lora(model, r=4, alpha=8, dropout=dropout, targets="all-linear")
    params = accel.prepare(
        model, Options(fast_path="off", gradient_checkpointing=checkpointing), note=lambda s: None
    ).params
    for p in params:  # a nonzero B, so that A's gradients are nonzero too
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(123)  # the dropout masks: drawn after the same RNG history in every variant
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offload_gives_the_gradients_of_plain_checkpointing(tiny_model_dir, dropout, monkeypatch):
    from lorafuse.accel import offload

    stashed, fetched = [], []
    real_init, real_fetch = offload._Stash.__init__, offload._Stash.fetch
    monkeypatch.setattr(offload._Stash, "__init__", lambda self, x: (stashed.append(x.shape), real_init(self, x))[1])
    monkeypatch.setattr(offload._Stash, "fetch", lambda self: (fetched.append(1), real_fetch(self))[1])
    loss_on, on = _grads(tiny_model_dir, True, dropout)
    assert not stashed
    loss_off, off = _grads(tiny_model_dir, "offload", dropout)
    assert len(stashed) == len(fetched) == 2, "each of the 2 layers stashed its input and fetched it in backward"
    assert loss_on == loss_off
    assert on.keys() == off.keys() and len(on) > 0
    for name in on:
        assert torch.allclose(on[name], off[name], rtol=1e-5, atol=1e-7), name
    assert all(g.abs().sum() > 0 for g in off.values()), "every LoRA tensor got a gradient"
    _, none = _grads(tiny_model_dir, False, dropout)
    for name in none:  # and both equal training without checkpointing
        assert torch.allclose(none[name], off[name], rtol=1e-5, atol=1e-7), name


def test_offload_is_installed_and_named_in_the_config(tiny_model_dir):
    cfg = load_config(None, ["train.gradient_checkpointing=offload"])
    assert cfg.train.gradient_checkpointing == "offload"
    model, _ = lorafuse.load_model(str(tiny_model_dir), quant="none", compute_dtype="float32", device="cpu")
    lorafuse.apply_lora(model, r=4, alpha=8, targets="all-linear")
    notes = []
    state = accel.prepare(model, Options(fast_path="off", gradient_checkpointing="offload"), note=notes.append)
    assert state.offload_layers == len(model.model.layers)
    assert all(layer._gradient_checkpointing_func is offload_checkpoint for layer in model.model.layers)
    assert any("activation offload" in n for n in notes)


def test_only_the_hidden_states_may_need_a_gradient():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="first input"):
        offload_checkpoint(lambda a, b: a * b, x, torch.randn(3, requires_grad=True))


@pytest.mark.gpu
def test_offload_on_cuda_matches_plain_checkpointing(tiny_model_dir):
    """On the GPU the input really goes to pinned memory on a side stream and comes back in backward."""
    loss_on, on = _grads(tiny_model_dir, True, device="cuda")
    loss_off, off = _grads(tiny_model_dir, "offload", device="cuda")
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_on)
    for name in on:
        assert torch.allclose(on[name], off[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.gpu
def test_a_forward_without_backward_leaves_nothing_behind(tiny_model_dir):
    """An out-of-memory error between forward and backward leaves the forward's stashes: the next forward gives
    their pinned buffers back (the pool does not grow) and the next step's gradients are a fresh run's."""
    from lorafuse.accel import offload

    loss_ref, ref = _grads(tiny_model_dir, "offload", device="cuda")
    pooled = offload.POOL.bytes
    torch.manual_seed(0)
    model, _ = lorafuse.load_model(str(tiny_model_dir), quant="none", compute_dtype="float32", device="cuda")
    lorafuse.apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    params = accel.prepare(
        model, Options(fast_path="off", gradient_checkpointing="offload"), note=lambda s: None
    ).params
    for p in params:
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    model(input_ids=ids, labels=ids)  # abandoned: no backward
    assert offload._LAST, "the abandoned forward left its stashes"
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert not offload._LAST and offload.POOL.bytes == pooled, "buffers came back and were reused"
    assert abs(float(loss) - loss_ref) <= 1e-6 * abs(loss_ref)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref[name], rtol=1e-5, atol=1e-7), name

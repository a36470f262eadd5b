"""LoRA+ (train.loraplus_lr_ratio): the B matrices learn at ratio x the learning rate, the rest at 1x, in every
optimizer and across a resume."""

from __future__ import annotations

import pytest
import torch
from toy import ToyBatches
from toy import toy_model as _toy

from lorafuse.config import TrainConfig
from lorafuse.model.inject import apply_lora
from lorafuse.training.loop import train_loop
from lorafuse.training.optim import LRSchedule, build_optimizer, lora_plus_groups


def toy_model(dropout: float = 0.1):
    """The training tests' toy Llama with a LoRA adapter on q and v (B starts at zero)."""
    torch.manual_seed(0)
    return apply_lora(_toy(dropout=dropout), r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _with_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in _trainable(model):
        p.grad = torch.randn(p.shape, generator=g)
    return model


def test_groups_put_exactly_the_b_matrices_at_the_ratio():
    model = toy_model()
    params = _trainable(model)
    assert lora_plus_groups(model, params, 1.0) is params  # one group: optimizers and checkpoints as without LoRA+
    rest, b = lora_plus_groups(model, params, 16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert b["lr_scale"] == 16.0 and rest["lr_scale"] == 1.0
    assert b["params"] and all(".lora_B." in names[id(p)] for p in b["params"])
    assert {id(p) for p in rest["params"]} == {id(p) for p in params} - {id(p) for p in b["params"]}
    assert any(".lora_A." in names[id(p)] for p in rest["params"])


def test_first_adamw_step_moves_b_ratio_times_as_far():
    """AdamW's first step moves each element by lr * g / (|g| + eps): B's by 16x that."""
    model = _with_grads(toy_model(dropout=0.0))
    params = _trainable(model)
    before = [p.detach().clone() for p in params]
    groups = lora_plus_groups(model, params, 16.0)
    optimizer = build_optimizer("adamw", groups, lr=1e-3, weight_decay=0.0)
    assert LRSchedule(1e-3, 10, kind="constant").apply(optimizer, 0) == 1e-3  # the logged lr is the schedule's
    optimizer.step()
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for p, p0 in zip(params, before):
        expected = p0 - 1e-3 * scale[id(p)] * p.grad / (p.grad.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_groups_equal_one_optimizer_per_rate(name):
    """Two groups at lr and 16 lr give, bit for bit, what two optimizers give, one per rate."""
    ours, twins = toy_model(dropout=0.0), toy_model(dropout=0.0)
    _with_grads(ours), _with_grads(twins)
    rest, b = lora_plus_groups(ours, _trainable(ours), 16.0)
    together = build_optimizer(name, [rest, b], lr=2e-3, weight_decay=0.01)
    t_rest, t_b = lora_plus_groups(twins, _trainable(twins), 16.0)
    apart = [build_optimizer(name, t_rest["params"], 2e-3, 0.01), build_optimizer(name, t_b["params"], 32e-3, 0.01)]
    LRSchedule(2e-3, 10, kind="constant").apply(together, 0)
    for _ in range(3):
        together.step()
        for opt in apart:
            opt.step()
    for p, q in zip(_trainable(ours), _trainable(twins)):
        assert torch.equal(p, q)


def _tc(**kw):
    base = dict(max_steps=6, grad_accum=2, lr=5e-3, warmup_steps=1, optimizer="adamw_8bit", log_every=1)
    return TrainConfig(gradient_checkpointing=False, save_total_limit=10, **{**base, **kw})


def test_a_loraplus_run_resumes_bit_for_bit_and_differs_from_a_plain_one(tmp_path):
    tc = _tc(loraplus_lr_ratio=16.0, save_every=3)
    full = train_loop(toy_model(), ToyBatches(), tc, out_dir=tmp_path / "full")
    resumed = train_loop(
        toy_model(), ToyBatches(), tc, out_dir=tmp_path / "full", resume_from=tmp_path / "full" / "checkpoint-3"
    )
    losses = [r["loss"] for r in full.rows if "loss" in r]
    assert [r["loss"] for r in resumed.rows if "loss" in r] == losses  # its rows: the checkpoint's and its own
    plain = train_loop(toy_model(), ToyBatches(), _tc(), out_dir=tmp_path / "plain")
    assert losses[0] == [r["loss"] for r in plain.rows if "loss" in r][0]  # B starts at 0: the same first loss
    assert losses[-1] != [r["loss"] for r in plain.rows if "loss" in r][-1]


def test_a_resume_with_another_ratio_is_refused(tmp_path):
    from lorafuse.errors import LorafuseError

    train_loop(toy_model(), ToyBatches(), _tc(save_every=3), out_dir=tmp_path)
    with pytest.raises(LorafuseError, match="trained with train.loraplus_lr_ratio=1, this run sets 16"):
        train_loop(
            toy_model(),
            ToyBatches(),
            _tc(loraplus_lr_ratio=16.0),
            out_dir=tmp_path,
            resume_from=tmp_path / "checkpoint-3",
        )
    train_loop(toy_model(), ToyBatches(), _tc(loraplus_lr_ratio=16.0, save_every=3), out_dir=tmp_path / "b")
    with pytest.raises(LorafuseError, match="trained with train.loraplus_lr_ratio=16, this run sets 8"):
        train_loop(
            toy_model(),
            ToyBatches(),
            _tc(loraplus_lr_ratio=8.0),
            out_dir=tmp_path / "b",
            resume_from=tmp_path / "b" / "checkpoint-3",
        )


def test_groups_find_peft_b_matrices_too():
    """The quality benchmark's peft stack trains with the same groups: peft names B `...lora_B.default.weight`."""
    peft = pytest.importorskip("peft")
    from lorafuse.model.tiny import build_tiny_model

    model = peft.get_peft_model(build_tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    params = _trainable(model)
    rest, b = lora_plus_groups(model, params, 16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(b["params"]) == len(rest["params"]) > 0
    assert all("lora_B" in names[id(p)] for p in b["params"]) and all("lora_A" in names[id(p)] for p in rest["params"])

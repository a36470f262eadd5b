"""LoRA+ (train.loraplus_lr_ratio): the B matrices learn at ratio x the learning rate, the rest at 1x; the modules
trained whole (lora.modules_to_save) at train.modules_to_save_lr; in every optimizer and across a resume."""

from __future__ import annotations

import pytest
import torch
from toy import ToyBatches
from toy import toy_model as _toy

from lorafuse.config import TrainConfig
from lorafuse.model.inject import apply_lora
from lorafuse.training.loop import train_loop
from lorafuse.training.optim import LRSchedule, build_optimizer, param_groups


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
    assert param_groups(model, params, 1.0) is params  # one group: optimizers and checkpoints as without LoRA+
    rest, b = param_groups(model, params, 16.0)
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
    groups = param_groups(model, params, 16.0)
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
    rest, b = param_groups(ours, _trainable(ours), 16.0)
    together = build_optimizer(name, [rest, b], lr=2e-3, weight_decay=0.01)
    t_rest, t_b = param_groups(twins, _trainable(twins), 16.0)
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
    with pytest.raises(
        LorafuseError, match="at train.lr for all, this run at the rest 1x train.lr, LoRA.'s B matrices 16x"
    ):
        train_loop(
            toy_model(),
            ToyBatches(),
            _tc(loraplus_lr_ratio=16.0),
            out_dir=tmp_path,
            resume_from=tmp_path / "checkpoint-3",
        )
    train_loop(toy_model(), ToyBatches(), _tc(loraplus_lr_ratio=16.0, save_every=3), out_dir=tmp_path / "b")
    with pytest.raises(
        LorafuseError, match="B matrices 16x train.lr, this run at the rest 1x train.lr, LoRA.'s B matrices 8x"
    ):
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
    rest, b = param_groups(model, params, 16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(b["params"]) == len(rest["params"]) > 0
    assert all("lora_B" in names[id(p)] for p in b["params"]) and all("lora_A" in names[id(p)] for p in rest["params"])


def head_model():
    """The toy Llama with LoRA on q and v and its output head trained whole (lora.modules_to_save)."""
    torch.manual_seed(0)
    model = _toy(dropout=0.0)
    return apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def test_the_modules_trained_whole_get_their_own_group_beside_loraplus():
    model = head_model()
    params = _trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert param_groups(model, params, 1.0, 1.0) is params
    groups = {g["role"]: g for g in param_groups(model, params, 16.0, 0.25)}
    assert {r: g["lr_scale"] for r, g in groups.items()} == {"rest": 1.0, "lora_B": 16.0, "modules_to_save": 0.25}
    assert [names[id(p)] for p in groups["modules_to_save"]["params"]] == ["lm_head.weight"]
    assert all(".lora_B." in names[id(p)] for p in groups["lora_B"]["params"])
    assert all(".lora_A." in names[id(p)] for p in groups["rest"]["params"])
    (rest, head) = param_groups(model, params, 1.0, 0.25)  # without LoRA+: B stays with the rest
    assert head["role"] == "modules_to_save" and len(rest["params"]) == len(params) - 1


def test_a_run_moves_the_head_at_modules_to_save_lr(tmp_path):
    """AdamW's first step moves each element by lr * g / (|g| + eps): the head's by train.modules_to_save_lr, B's
    by train.lr (A's gradient is zero while B is)."""
    model = head_model()
    head0, b0 = (
        model.lm_head.weight.detach().clone(),
        model.model.layers[0].self_attn.q_proj.lora_B.weight.detach().clone(),
    )
    tc = _tc(max_steps=1, grad_accum=1, lr=1e-3, modules_to_save_lr=1e-4, warmup_steps=0, optimizer="adamw")
    train_loop(model, ToyBatches(), TrainConfig(**{**tc.model_dump(), "scheduler": "constant"}), out_dir=tmp_path)
    step_head = (model.lm_head.weight.detach() - head0).abs().max().item()
    step_b = (model.model.layers[0].self_attn.q_proj.lora_B.weight.detach() - b0).abs().max().item()
    assert step_head == pytest.approx(1e-4, rel=1e-3) and step_b == pytest.approx(1e-3, rel=1e-3)


def test_a_resume_with_another_modules_rate_is_refused(tmp_path):
    from lorafuse.errors import LorafuseError

    train_loop(head_model(), ToyBatches(), _tc(save_every=3, modules_to_save_lr=1e-3), out_dir=tmp_path)
    with pytest.raises(LorafuseError, match="lora.modules_to_save 0.2x train.lr, this run at train.lr for all"):
        train_loop(head_model(), ToyBatches(), _tc(), out_dir=tmp_path, resume_from=tmp_path / "checkpoint-3")


def test_modules_to_save_lr_needs_modules_to_save():
    from lorafuse.config import validate_config
    from lorafuse.errors import ConfigError

    cfg = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "train": {"modules_to_save_lr": 1e-5}}
    with pytest.raises(ConfigError, match="lora.modules_to_save, which lists no module"):
        validate_config(cfg)
    cfg["lora"] = {"modules_to_save": ["lm_head"]}
    assert validate_config(cfg).train.modules_to_save_lr == 1e-5


def rows_model():
    """The toy Llama with LoRA on q and v and trainable token rows for ids 10-39 in both tables."""
    from lorafuse.lora import token_rows

    model = toy_model(dropout=0.0)
    ids = torch.arange(10, 40)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    token_rows.attach(model, ids, emb[ids].detach(), None if head is emb else head[ids].detach())
    return model


def test_the_token_rows_get_their_own_group():
    model = rows_model()
    params = _trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert param_groups(model, params) is params
    groups = {g["role"]: g for g in param_groups(model, params, token_rows_scale=8.0)}
    assert {r: g["lr_scale"] for r, g in groups.items()} == {"rest": 1.0, "token_rows": 8.0}
    assert groups["token_rows"]["params"]
    assert all(names[id(p)].endswith("trainable_tokens_delta") for p in groups["token_rows"]["params"])
    assert not any("trainable_tokens" in names[id(p)] for p in groups["rest"]["params"])


def test_a_run_moves_the_token_rows_at_token_rows_lr(tmp_path):
    """AdamW's first step moves each element with a gradient by lr * g / (|g| + eps): the rows' by
    train.token_rows_lr, B's by train.lr."""
    from lorafuse.lora.token_rows import state

    model = rows_model()
    rows = state(model).embed_rows.values
    rows0, b0 = rows.detach().clone(), model.model.layers[0].self_attn.q_proj.lora_B.weight.detach().clone()
    tc = _tc(max_steps=1, grad_accum=1, lr=1e-3, token_rows_lr=1e-2, warmup_steps=0, optimizer="adamw")
    train_loop(model, ToyBatches(), TrainConfig(**{**tc.model_dump(), "scheduler": "constant"}), out_dir=tmp_path)
    step_rows = (rows.detach() - rows0).abs().max().item()
    step_b = (model.model.layers[0].self_attn.q_proj.lora_B.weight.detach() - b0).abs().max().item()
    assert step_rows == pytest.approx(1e-2, rel=1e-3) and step_b == pytest.approx(1e-3, rel=1e-3)


def test_a_resume_with_another_token_rows_rate_is_refused(tmp_path):
    from lorafuse.errors import LorafuseError

    train_loop(rows_model(), ToyBatches(), _tc(save_every=3), out_dir=tmp_path)
    with pytest.raises(LorafuseError, match="train.lr for all, this run at the rest 1x train.lr, the token rows 4x"):
        train_loop(
            rows_model(), ToyBatches(), _tc(token_rows_lr=2e-2), out_dir=tmp_path, resume_from=tmp_path / "checkpoint-3"
        )


def test_token_rows_lr_needs_rows_to_train():
    from lorafuse.config import validate_config
    from lorafuse.errors import ConfigError

    cfg = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "train": {"token_rows_lr": 1e-3}}
    assert validate_config(cfg).train.token_rows_lr == 1e-3  # the default finds and trains untrained rows
    cfg["lora"] = {"train_untrained_tokens": "off"}
    with pytest.raises(ConfigError, match="this run trains none"):
        validate_config(cfg)
    cfg["data"]["add_special_tokens"] = ["<|im_start|>"]
    assert validate_config(cfg).train.token_rows_lr == 1e-3

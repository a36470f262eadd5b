"""DPO (sigmoid, IPO) and ORPO equal TRL's trainers on the same tiny model, data and adapter values, to fp32 rounding.

Setup: the tiny random Llama (fp32), LoRA r=8 on the seven projections with random non-zero A and B (B = 0 would
make policy == reference and every gradient of the log-ratios trivial), copied into a peft model that TRL's
DPOTrainer / ORPOTrainer wrap; TRL's inputs are built from our batch's token ids (the same rows and masks).

Tolerance (DESIGN style 2): the truth is a third computation in float64 (peft's model, full logits,
log_softmax, the paper formulas written out below). lorafuse's fp32 error against it may be at most twice TRL's
own fp32 error plus two fp32 ulps of the magnitude involved (the floor keeps a quantity TRL happens to get exactly
right from demanding the same luck of us). Magnitudes: a gradient set's largest |g|; a log-prob's |value|;
rewards, margins and losses are computed from log-probs, so their magnitude is beta (or 1 / tokens for IPO, 1 for
ORPO's NLL) times the summed |log-probs| they are made of.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from lorafuse.accel import simple_head
from lorafuse.config import DataConfig
from lorafuse.data.build import _from_lists, build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.training.objectives import ObjectiveContext
from lorafuse.training.objectives.dpo import DPOObjective
from lorafuse.training.objectives.orpo import ORPOObjective
from lorafuse.training.runtime import Precision

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1
EPS = torch.finfo(torch.float32).eps
CPU = ObjectiveContext(Precision(torch.device("cpu"), torch.float32))


@pytest.fixture(scope="module")
def trl():
    """TRL and peft, imported once for the module (trl's import takes seconds)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import peft
    import trl
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return trl, peft, Dataset, ORPOConfig, ORPOTrainer


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    data = DataConfig(path="builtin:preference", format="preference", prompt_format="alpaca", max_length=128)
    return build_datasets(data, tiny_tokenizer)[0]


def _batch(pairs, tok, n):
    return next(Batcher(pairs, n, tok.pad_token_id, pairs=True, seed=3).epoch_batches(0))


def _lora_values(tok, seed=0):
    """Our model with random A (kaiming, seeded) and random non-zero B."""
    torch.manual_seed(seed)
    model = apply_lora(build_tiny_model(tokenizer=tok), r=8, alpha=16, dropout=0.0, targets=TARGETS)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return model


def _key(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".default", "")


def _copy_adapter(peft_model, ours) -> None:
    values = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data.copy_(values[_key(name)].data)


def _grads(model) -> dict[str, torch.Tensor]:
    return {_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _peft_truth(trl, tok, ours):
    """peft's model over the same base and adapter values, in float64."""
    _, peft, *_ = trl
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(build_tiny_model(tokenizer=tok), config)
    _copy_adapter(model, ours)
    return model.double().train()


def _logps64(model, batch):
    """(summed response log-probs, response tokens) per row, float64, from the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(1), mask.sum(1)


def _check(name, ours, trl32, truth, magnitude):
    ours, trl32, truth = (torch.as_tensor(t, dtype=torch.float64) for t in (ours, trl32, truth))
    err, ref = (ours - truth).abs().max().item(), (trl32 - truth).abs().max().item()
    bound = 2 * ref + 2 * EPS * float(magnitude)
    assert err <= bound, f"{name}: |lorafuse - fp64| = {err:.3e} > {bound:.3e} (TRL's fp32 error {ref:.3e})"


def _check_grads(ours, theirs, truth):
    for part in ("lora_A", "lora_B"):
        keys = [k for k in truth if part in k]
        cat = [torch.cat([d[k].flatten() for k in keys]) for d in (ours, theirs, truth)]
        _check(f"{part} gradients", *cat, cat[2].abs().max())


# ------------------------------------------------------------------------------------------------ DPO
@pytest.fixture(scope="module")
def dpo_trainer(trl, tiny_tokenizer):
    trl_mod, peft, Dataset, *_ = trl
    args = trl_mod.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,
        max_length=None,
        beta=BETA,
        disable_dropout=True,
    )
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    rows = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # required; we feed batches ourselves
    return trl_mod.DPOTrainer(
        model=build_tiny_model(tokenizer=tiny_tokenizer),
        args=args,
        train_dataset=rows,
        processing_class=tiny_tokenizer,
        peft_config=lora,
    )


def _dpo_truth(model, batch, loss_type):
    n = batch["input_ids"].shape[0] // 2
    logps, tokens = _logps64(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = _logps64(model, batch)
    rho = logps - ref
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(BETA * (rho[:n] - rho[n:]))
    else:
        losses = (rho[:n] / tokens[:n] - rho[n:] / tokens[n:] - 1 / (2 * BETA)) ** 2
    losses.mean().backward()
    r_c, r_r = BETA * rho[:n].detach(), BETA * rho[n:].detach()
    return losses.detach(), r_c, r_r, logps.detach(), ref


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl_dpo_trainer(trl, dpo_trainer, tiny_tokenizer, pairs, loss_type):
    batch = _batch(pairs, tiny_tokenizer, 4)
    ours = _lora_values(tiny_tokenizer)
    objective = DPOObjective(beta=BETA, loss=loss_type)
    loss_sum, metrics = objective.loss_sum(ours, batch, ObjectiveContext(CPU.precision, simple_head(ours)))
    units = objective.units(batch)
    (loss_sum / units).backward()

    trainer = dpo_trainer
    trainer.loss_types = [loss_type]  # the parsed DPOConfig(loss_type=...) the trainer reads at each step
    _copy_adapter(trainer.model, ours)
    trainer.model.zero_grad()
    trainer.model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    inputs["completion_mask"] = (batch["labels"] != -100).long()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    truth = _peft_truth(trl, tiny_tokenizer, ours)
    losses, r_c, r_r, logps, ref = _dpo_truth(truth, batch, loss_type)
    n, size = units, (logps.abs() + ref.abs()).detach()
    pair_size = size[:n] + size[n:]
    tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
    scale = BETA if loss_type == "sigmoid" else 2 * (losses.sqrt().max()) / tokens.min()
    _check("loss", loss_sum.item() / units, trl_loss.item(), losses.mean(), scale * pair_size.max() + losses.max())
    expected = {
        "rewards/chosen": ("rewards/chosen", r_c.mean(), BETA * size[:n].max()),
        "rewards/rejected": ("rewards/rejected", r_r.mean(), BETA * size[n:].max()),
        "rewards/margin": ("rewards/margins", (r_c - r_r).mean(), BETA * pair_size.max()),
        "logps/chosen": ("logps/chosen", logps[:n].mean(), logps.abs().max()),
        "logps/rejected": ("logps/rejected", logps[n:].mean(), logps.abs().max()),
    }
    for name, (trl_name, value, magnitude) in expected.items():
        _check(name, metrics[name].item() / units, logged[trl_name], value, magnitude)
    assert metrics["rewards/accuracy"].item() / units == logged["rewards/accuracies"] == (r_c > r_r).double().mean()
    _check_grads(_grads(ours), _grads(trainer.model), _grads(truth))


def test_first_dpo_step_is_ln2_with_a_fresh_adapter(tiny_tokenizer, pairs):
    """B = 0: policy and reference are the same function bit for bit, so every log-ratio is exactly 0."""
    batch = _batch(pairs, tiny_tokenizer, 4)
    torch.manual_seed(0)
    model = apply_lora(build_tiny_model(tokenizer=tiny_tokenizer), r=8, alpha=16, dropout=0.0, targets=TARGETS)
    for loss_type, first in (("sigmoid", torch.tensor(math.log(2), dtype=torch.float32)), ("ipo", 25.0)):
        objective = DPOObjective(beta=BETA, loss=loss_type)
        loss_sum, metrics = objective.loss_sum(model, batch, CPU)
        assert (loss_sum / objective.units(batch)).item() == float(first)
        assert all(metrics[k].item() == 0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"))


# ------------------------------------------------------------------------------------------------ ORPO
@pytest.fixture(scope="module")
def orpo_trainer(trl, tiny_tokenizer):
    _, peft, Dataset, ORPOConfig, ORPOTrainer = trl
    args = ORPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,
        max_length=128,
        beta=BETA,  # ORPO's lambda
        remove_unused_columns=False,
    )
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return ORPOTrainer(
        model=build_tiny_model(tokenizer=tiny_tokenizer),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=tiny_tokenizer,
        peft_config=lora,
    )


def _orpo_inputs(batch):
    """TRL's chosen_* / rejected_* tensors from our (chosen rows, rejected rows) batch."""
    n = batch["input_ids"].shape[0] // 2
    out = {}
    for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = batch["labels"][rows]
    return out


def _orpo_truth(model, batch):
    n = batch["input_ids"].shape[0] // 2
    logps, tokens = _logps64(model, batch)
    mean = logps / tokens
    l_c, l_r = mean[:n], mean[n:]
    log_odds = (l_c - l_r) - (torch.log1p(-torch.exp(l_c)) - torch.log1p(-torch.exp(l_r)))
    losses = -l_c - BETA * F.logsigmoid(log_odds)
    losses.mean().backward()
    return losses.detach(), l_c.detach(), l_r.detach(), log_odds.detach()


def _orpo_ours(tok, batch):
    ours = _lora_values(tok, seed=5)
    objective = ORPOObjective(lam=BETA)
    loss_sum, metrics = objective.loss_sum(ours, batch, ObjectiveContext(CPU.precision, simple_head(ours)))
    units = objective.units(batch)
    (loss_sum / units).backward()
    return ours, loss_sum.item() / units, {k: v.item() / units for k, v in metrics.items()}


def _check_orpo(ours, trl_side, truth, batch):
    """ours = (model, loss, metrics); trl_side = (loss, metrics under TRL's names, gradients)."""
    model, loss, metrics = ours
    trl_loss, logged, trl_grads = trl_side
    losses, l_c, l_r, log_odds = _orpo_truth(truth, batch)
    mag = max(l_c.abs().max(), l_r.abs().max())  # per-token mean log-probs: the NLL and the log odds come from them
    _check("loss", loss, trl_loss, losses.mean(), (1 + 2 * BETA) * mag + losses.max())
    expected = {
        "rewards/chosen": ("rewards/chosen", BETA * l_c.mean(), BETA * mag),
        "rewards/rejected": ("rewards/rejected", BETA * l_r.mean(), BETA * mag),
        "rewards/margin": ("rewards/margins", BETA * (l_c - l_r).mean(), 2 * BETA * mag),
        "logps/chosen": ("logps/chosen", l_c.mean(), mag),
        "logps/rejected": ("logps/rejected", l_r.mean(), mag),
        "log_odds_chosen": ("log_odds_chosen", log_odds.mean(), 4 * mag),
        "log_odds_ratio": ("log_odds_ratio", F.logsigmoid(log_odds).mean(), 4 * mag),
        "nll": ("nll_loss", -l_c.mean(), mag),
    }
    for name, (trl_name, value, magnitude) in expected.items():
        _check(name, metrics[name], logged[trl_name], value, magnitude)
    assert metrics["rewards/accuracy"] == logged["rewards/accuracies"] == (l_c > l_r).double().mean()
    _check_grads(_grads(model), trl_grads, _grads(truth))


def _bos_prompt_pair(pairs, tok):
    """Pair 0's two responses after a prompt of the BOS token alone, batched as one pair."""
    ids, labels = [], []
    for row in (0, 1):
        ex = pairs[row]
        response = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        ids.append([tok.bos_token_id] + response)
        labels.append([-100] + response)
    return next(Batcher(_from_lists(ids, labels, [0, 0]), 1, tok.pad_token_id, pairs=True).epoch_batches(0))


def test_orpo_equals_trl_orpo_trainer_end_to_end(trl, orpo_trainer, tiny_tokenizer, pairs):
    """One pair whose prompt is the BOS token alone: TRL's NLL over every non-pad token of the chosen row is then
    exactly the response NLL per token that ORPO's paper (and lorafuse) trains, so the whole loss must agree."""
    batch = _bos_prompt_pair(pairs, tiny_tokenizer)
    ours = _orpo_ours(tiny_tokenizer, batch)
    trainer = orpo_trainer
    _copy_adapter(trainer.model, ours[0])
    trainer.model.zero_grad()
    trainer.model.train()
    trainer._stored_metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, _orpo_inputs(batch))
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    trl_side = (trl_loss.item(), logged, _grads(trainer.model))
    _check_orpo(ours, trl_side, _peft_truth(trl, tiny_tokenizer, ours[0]), batch)


def test_orpo_equals_trl_orpo_loss_on_prompted_pairs(trl, orpo_trainer, tiny_tokenizer, pairs):
    """Four pairs with their prompts: TRL's own per-token log-probs (`get_batch_logps`, full logits) and odds-ratio
    loss (`odds_ratio_loss`), with the paper's NLL (the mean chosen log-prob per token) in place of TRL's NLL over
    prompt and response tokens of the whole micro-batch."""
    batch = _batch(pairs, tiny_tokenizer, 4)
    ours = _orpo_ours(tiny_tokenizer, batch)
    trainer = orpo_trainer
    _copy_adapter(trainer.model, ours[0])
    trainer.model.zero_grad()
    trainer.model.train()
    n = batch["num_pairs"]
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = trainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    ratio_losses, r_c, r_r, ratio, log_odds = trainer.odds_ratio_loss(logps[:n], logps[n:])
    trl_loss = (-logps[:n]).mean() - ratio_losses.mean()
    trl_loss.backward()
    logged = {
        "rewards/chosen": r_c.mean().item(),
        "rewards/rejected": r_r.mean().item(),
        "rewards/margins": (r_c - r_r).mean().item(),
        "rewards/accuracies": (r_c > r_r).float().mean().item(),
        "logps/chosen": logps[:n].mean().item(),
        "logps/rejected": logps[n:].mean().item(),
        "log_odds_ratio": ratio.item(),
        "log_odds_chosen": log_odds.item(),
        "nll_loss": (-logps[:n]).mean().item(),
    }
    _check_orpo(
        ours, (trl_loss.item(), logged, _grads(trainer.model)), _peft_truth(trl, tiny_tokenizer, ours[0]), batch
    )

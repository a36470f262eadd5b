"""The objective interface: SFT wrapper, DPO's two references, pair units under accumulation, evaluate, factory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorafuse.accel import simple_head
from lorafuse.config import DataConfig, TrainConfig
from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.errors import ConfigError, LorafuseError
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.training.loss import count_targets, forward_batch, lm_loss_sum
from lorafuse.training.objectives import ObjectiveContext, build_objective, evaluate
from lorafuse.training.objectives.dpo import DPOObjective, check_live_reference, precompute_reference_logps
from lorafuse.training.objectives.orpo import ORPOObjective
from lorafuse.training.objectives.sft import SFTObjective
from lorafuse.training.runtime import Precision

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISION = Precision(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    data = DataConfig(path="builtin:preference", format="preference", prompt_format="alpaca", max_length=128)
    return build_datasets(data, tiny_tokenizer)[0].subset(np.arange(24))  # 12 pairs


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return apply_lora(build_tiny_model(tokenizer=tok), r=8, alpha=16, dropout=0.0, targets=TARGETS)


def _ctx(model):
    return ObjectiveContext(PRECISION, simple_head(model))


def test_sft_objective_is_the_summed_lm_loss_per_target(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    rows = build_datasets(DataConfig(path="builtin:demo", num_rows=8, max_length=128), tiny_tokenizer)[0]
    batch = next(Batcher(rows, 4, tiny_tokenizer.pad_token_id).epoch_batches(0))
    objective = SFTObjective()
    loss, metrics = objective.loss_sum(model, batch, _ctx(model))
    expected = lm_loss_sum(model, forward_batch(model, batch, PRECISION), simple_head(model))
    assert torch.equal(loss, expected) and metrics == {}
    assert objective.units(batch) == count_targets(batch) > 0


def test_precomputed_reference_equals_the_live_one(tiny_tokenizer, pairs):
    """Fresh adapter: the model as it starts IS the base, so the precomputed values are the live reference's,
    bit for bit, also after the adapter has moved (the live reference switches it off)."""
    model = _model(tiny_tokenizer)
    check_live_reference(model)  # a fresh adapter passes
    batches = Batcher(pairs, 3, tiny_tokenizer.pad_token_id, pairs=True, shuffle=False)
    live, pre = DPOObjective(reference="live"), DPOObjective(reference="precomputed")
    pairs.ref_logps = precompute_reference_logps(model, batches, _ctx(model), len(pairs), live)
    try:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for batch in batches.epoch_batches(0):
            loss_live, m_live = live.loss_sum(model, batch, _ctx(model))
            loss_pre, m_pre = pre.loss_sum(model, batch, _ctx(model))
            assert torch.equal(loss_live, loss_pre)
            assert all(torch.equal(m_live[k], m_pre[k]) for k in live.metric_names)
            loss_live.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert m_live["rewards/margin"] != 0  # the adapter moved, so the comparison was not between zeros
        with pytest.raises(ConfigError, match="dpo_reference=precomputed"):
            check_live_reference(model)  # a non-zero adapter is not the base any more
    finally:
        del pairs.ref_logps


def test_precomputed_reference_missing_from_the_batch(tiny_tokenizer, pairs):
    model = _model(tiny_tokenizer)
    batch = next(Batcher(pairs, 2, tiny_tokenizer.pad_token_id, pairs=True).epoch_batches(0))
    with pytest.raises(LorafuseError, match="no reference log-probs"):
        DPOObjective(reference="precomputed").loss_sum(model, batch, _ctx(model))


@pytest.mark.parametrize("objective", [DPOObjective(beta=0.1), DPOObjective(loss="ipo"), ORPOObjective(0.1)])
def test_pair_units_make_accumulation_equal_one_batch(tiny_tokenizer, pairs, objective):
    """Losses summed per pair and divided by the window's pairs: 2 + 2 pairs == 4 pairs. Rows are padded to one
    width, so each pair's loss is computed alike either way and only the order of the four-term sum differs."""
    model = _model(tiny_tokenizer)
    for p in model.parameters():  # a moved adapter, so the reference differs from the policy
        if p.requires_grad:
            p.data += 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))

    def batches(size):
        kw = dict(pairs=True, shuffle=False, max_length=128, pad_to_multiple_of=128)
        return list(Batcher(pairs, size, tiny_tokenizer.pad_token_id, **kw).epoch_batches(0))

    whole, halves = batches(4)[0], batches(2)[:2]
    units = sum(objective.units(b) for b in halves)
    assert units == objective.units(whole) == 4
    with torch.no_grad():
        split = [objective.loss_sum(model, b, _ctx(model))[0].item() for b in halves]
        total = objective.loss_sum(model, whole, _ctx(model))[0].item()
    eps = torch.finfo(torch.float32).eps
    assert abs(sum(split) / units - total / units) <= 2 * eps * (abs(split[0]) + abs(split[1])) / units


def test_evaluate_gives_means_per_pair(tiny_tokenizer, pairs):
    model = _model(tiny_tokenizer).train()
    batches = Batcher(pairs, 5, tiny_tokenizer.pad_token_id, pairs=True, shuffle=False)
    out = evaluate(DPOObjective(), model, batches, _ctx(model))
    assert out["units"] == 12 and model.training  # the mode comes back
    assert math.isclose(out["loss"], math.log(2), rel_tol=1e-6) and out["rewards/accuracy"] == 0.0
    logps = precompute_reference_logps(model, batches, _ctx(model), len(pairs))
    assert math.isclose(out["logps/chosen"], float(logps[0::2].mean()), rel_tol=1e-6)


def test_build_objective_reads_the_train_config():
    dpo = build_objective(TrainConfig(objective="dpo", beta=0.3, dpo_loss="ipo", dpo_reference="precomputed"))
    assert (dpo.name, dpo.beta, dpo.loss, dpo.reference) == ("dpo", 0.3, "ipo", "precomputed")
    assert build_objective(TrainConfig(objective="orpo", orpo_lambda=0.25)).lam == 0.25
    assert build_objective(TrainConfig()).name == "sft"

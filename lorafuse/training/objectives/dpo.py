"""Direct Preference Optimization (DPO, and IPO) on LoRA, with the reference model taken from the same weights.

A micro-batch of B pairs is 2B rows (`lorafuse.data.collate.Batcher` with pairs): the chosen responses, then the
rejected ones, each after its prompt, labels -100 outside the response. One forward gives every row's summed
response log-probability (`logps.sequence_logps`, chunked through the head) pi_c, pi_r (B,); the reference gives
ref_c, ref_r (B,). With the log-ratios rho_c = pi_c - ref_c, rho_r = pi_r - ref_r, per pair:

    sigmoid (the DPO paper):  loss = -log sigmoid( beta (rho_c - rho_r) )
    ipo:                      loss = ( rho_c / n_c - rho_r / n_r - 1 / (2 beta) )^2     n = response tokens of the row
                              (IPO's squared loss on per-token log-ratios, as TRL's `loss_type="ipo"`)
    rewards: r_c = beta rho_c, r_r = beta rho_r; margin r_c - r_r; accuracy [r_c > r_r]

One unit per pair: `loss_sum` returns the sum over the pairs, so the loop's loss is the mean over a step's pairs.
Metrics (summed, logged as means): rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy,
logps/chosen, logps/rejected (pi summed over the response tokens).

The reference (`train.dpo_reference`):
  * live: this model with the adapter switched off (`lorafuse.lora.disable.adapters_disabled`), without gradients
    and with dropout off, in the same micro-step, on the same inputs: no copy of the model, one forward more.
    It is the model DPO starts from only when the adapter starts at zero (a fresh adapter, or one merged into the
    base before): `check_live_reference` says so at start-up instead of training toward the wrong model.
  * precomputed: `precompute_reference_logps` runs once over a data set before the first step, with the model
    as it starts (adapter on, dropout off), and the Batcher hands each batch its rows' values as "ref_logps" (2B,).
    No reference forward per step; also right when training continues a trained adapter.
With B = 0 in a fresh adapter the policy equals the reference bit for bit, so the first step's loss is ln 2.

Dtype policy: log-probs, log-ratios and the loss are fp32 whatever the compute dtype.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from lorafuse.data.collate import CUDA_PAD_MULTIPLE
from lorafuse.data.pair_layout import share_prompts
from lorafuse.errors import ConfigError, LorafuseError
from lorafuse.lora.disable import adapters_disabled
from lorafuse.lora.linear import LoRALinear
from lorafuse.training.loss import forward_batch
from lorafuse.training.objectives.base import Objective, ObjectiveContext, objective_inputs
from lorafuse.training.objectives.logps import sequence_logps, sequence_tokens

DPO_LOSSES = ("sigmoid", "ipo")
REFERENCES = ("live", "precomputed")
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


def pair_count(batch: dict) -> int:
    """Pairs in a preference micro-batch (its rows are the chosen responses, then the rejected ones)."""
    return int(batch["num_pairs"]) if "num_pairs" in batch else batch["input_ids"].shape[0] // 2


def dpo_pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards), each (B,) fp32, from summed response log-probs (B,).

    `chosen_tokens` / `rejected_tokens` (B,): response token counts, read by the ipo loss only.
    """
    rho_c, rho_r = chosen.float() - ref_chosen.float(), rejected.float() - ref_rejected.float()
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (rho_c - rho_r))
    elif loss == "ipo":
        per_token = rho_c / chosen_tokens.clamp(min=1) - rho_r / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} (one of {DPO_LOSSES})")
    return losses, beta * rho_c.detach(), beta * rho_r.detach()


def pair_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The PAIR_METRICS summed over the pairs (fp32 scalars, no grad)."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": chosen.sum(),
        "logps/rejected": rejected.sum(),
    }


def shares_prompt(mode: str, model) -> bool:
    """Whether pairs run with their prompt once (`lorafuse.data.pair_layout`), for train.shared_prompt `mode`:
    auto and on where the attention takes the layout's 4-D mask (SDPA, eager), off never; on elsewhere is an error."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if mode == "off":
        return False
    if impl in ("sdpa", "eager"):
        return True
    if mode == "on":
        raise ConfigError(
            f"train.shared_prompt=on needs an attention that takes a 4-D mask; model.attn_implementation={impl} does "
            "not",
            "set model.attn_implementation to sdpa (or eager), or train.shared_prompt to auto or off",
        )
    return False


class PairObjective(Objective):
    """What DPO and ORPO share: a unit is a pair, and the pairs' rows are laid out for the forward by
    `train.shared_prompt` (`shared_prompt`: auto | on | off, see `shares_prompt`)."""

    shared_prompt = "auto"

    def units(self, batch: dict) -> int:
        return pair_count(batch)

    def inputs(self, model, batch: dict, precision) -> dict:
        if "pair_segments" not in batch and shares_prompt(self.shared_prompt, model):
            multiple = CUDA_PAD_MULTIPLE if precision.device.type == "cuda" else 1
            batch = share_prompts(batch, multiple)
        return objective_inputs(model, batch, precision)


class DPOObjective(PairObjective):
    name = "dpo"
    metric_names = PAIR_METRICS

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", reference: str = "live", shared_prompt="auto"):
        if loss not in DPO_LOSSES or reference not in REFERENCES:
            raise ValueError(f"DPO loss {loss!r} / reference {reference!r}: one of {DPO_LOSSES} / {REFERENCES}")
        self.beta, self.loss, self.reference, self.shared_prompt = float(beta), loss, reference, shared_prompt

    def loss_on_inputs(self, model, inputs: dict, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict]:
        inputs = dict(inputs)
        ref = self._reference_logps(model, inputs.pop("ref_logps", None), inputs, ctx)
        with ctx.precision.autocast():
            logps = sequence_logps(model, inputs, ctx.head, ctx.fused)  # (2B,): chosen rows, then rejected
        n = logps.shape[0] // 2
        tokens = sequence_tokens(inputs)
        losses, r_c, r_r = dpo_pair_losses(
            logps[:n], logps[n:], ref[:n], ref[n:], self.beta, self.loss, tokens[:n], tokens[n:]
        )
        return losses.sum(), pair_metrics(r_c, r_r, logps[:n], logps[n:])

    def _reference_logps(self, model, precomputed, inputs: dict, ctx: ObjectiveContext) -> torch.Tensor:
        if self.reference == "precomputed":
            if precomputed is None:
                raise LorafuseError(
                    "train.dpo_reference=precomputed, but the batch carries no reference log-probs",
                    "compute them before training (lorafuse.training.objectives.dpo.precompute_reference_logps) "
                    "and attach them to the data set (dataset.ref_logps)",
                )
            return precomputed
        with torch.no_grad(), adapters_disabled(model), _eval_mode(model), ctx.precision.autocast():
            return sequence_logps(model, inputs, ctx.head, ctx.fused)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off for a reference pass (a reference is deterministic); the previous mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_live_reference(model) -> None:
    """At a fresh start with train.dpo_reference=live: the adapter switched off must be the model training starts
    from, i.e. every LoRA B is zero and the adapter can be switched off. ConfigError otherwise (not at a resume,
    where B is rightly non-zero)."""
    with adapters_disabled(model):  # raises where switching off cannot give the base model
        pass
    trained = [m for m in model.modules() if isinstance(m, LoRALinear) and bool(m.lora_B.weight.count_nonzero())]
    if trained:
        raise ConfigError(
            f"train.dpo_reference=live takes the model with its adapter switched off as DPO's reference, but the "
            f"adapter training starts from is not zero ({len(trained)} LoRA layers have non-zero B, e.g. a loaded "
            "adapter): DPO would pull toward the base model instead of the model it starts from",
            "set train.dpo_reference=precomputed (the reference is then the model as training starts), or merge "
            "the adapter into the base (`lorafuse merge`) and train a fresh adapter on the merged model",
        )


@torch.no_grad()
def precompute_reference_logps(
    model, batches, ctx: ObjectiveContext, rows: int, objective: Objective | None = None
) -> np.ndarray:
    """(rows,) float32: each data set row's summed response log-probability under `model` as it is now (adapter
    on, dropout off), over one pass of `batches` (any order; batches carry their data set "rows"), laid out as
    `objective` lays its pairs out for training (None: a row per answer)."""
    out = np.full(rows, np.nan, dtype=np.float32)
    with _eval_mode(model):
        for batch in batches.epoch_batches(0):
            if objective is None:
                inputs = forward_batch(model, batch, ctx.precision)
            else:
                inputs = objective.inputs(model, batch, ctx.precision)
            with ctx.precision.autocast():
                logps = sequence_logps(model, inputs, ctx.head, ctx.fused)
            out[batch["rows"].numpy()] = logps.float().cpu().numpy()
    if np.isnan(out).any():
        raise LorafuseError(
            f"{int(np.isnan(out).sum())} of {rows} rows got no reference log-prob (the batches do not cover the "
            "data set: sharded or cut)",
            "precompute over an unsharded Batcher of the whole data set",
        )
    return out

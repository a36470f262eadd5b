"""ORPO: odds-ratio preference optimisation, the preference term and the SFT loss in one objective, no reference.

Per pair, from one forward over the chosen rows then the rejected rows (as DPO, `dpo.py`), with the mean
log-probability per response token (the paper's length-normalised likelihood) l_c = pi_c / n_c, l_r = pi_r / n_r:

    log_odds = (l_c - l_r) - ( log(1 - e^{l_c}) - log(1 - e^{l_r}) )        log odds(y) = l - log(1 - e^l)
    loss     = -l_c  -  lambda * log sigmoid(log_odds)                       lambda = train.orpo_lambda

-l_c is the chosen response's NLL per token (the paper's L_SFT, on the response tokens only, as the authors'
`disable_prompt_loss`; TRL's ORPOTrainer instead averages its NLL over every token of the chosen rows, prompt
included, and over the whole micro-batch). One unit per pair; `loss_sum` is the sum over the pairs.
log(1 - e^x) is computed as log1p(-e^x) below x = -ln 2 and log(-expm1(x)) above (no cancellation either side).

Metrics (summed, logged as means), with TRL's names and definitions: rewards/chosen = lambda l_c,
rewards/rejected = lambda l_r, rewards/margin, rewards/accuracy [lambda l_c > lambda l_r], logps/chosen = l_c,
logps/rejected = l_r, log_odds_ratio = log sigmoid(log_odds), log_odds_chosen = log_odds, nll = -l_c.

Dtype policy: everything after the log-probs is fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorafuse.training.objectives.base import ObjectiveContext
from lorafuse.training.objectives.dpo import PAIR_METRICS, PairObjective, pair_metrics
from lorafuse.training.objectives.logps import sequence_logps, sequence_tokens


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_pair_losses(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, log odds ratio), (B,) fp32, from mean per-token response log-probs (B,)."""
    l_c, l_r = chosen_mean.float(), rejected_mean.float()
    log_odds = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))
    return -l_c - lam * F.logsigmoid(log_odds), log_odds


class ORPOObjective(PairObjective):
    name = "orpo"
    metric_names = (*PAIR_METRICS, "log_odds_ratio", "log_odds_chosen", "nll")

    def __init__(self, lam: float = 0.1, shared_prompt: str = "auto"):
        self.lam, self.shared_prompt = float(lam), shared_prompt

    def loss_on_inputs(self, model, inputs: dict, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict]:
        with ctx.precision.autocast():
            logps = sequence_logps(model, inputs, ctx.head, ctx.fused)  # (2B,): chosen rows, then rejected
        mean = logps / sequence_tokens(inputs).clamp(min=1)
        n = mean.shape[0] // 2
        losses, log_odds = orpo_pair_losses(mean[:n], mean[n:], self.lam)
        l_c, l_r = mean[:n].detach(), mean[n:].detach()
        metrics = pair_metrics(self.lam * l_c, self.lam * l_r, l_c, l_r)
        metrics["log_odds_ratio"] = F.logsigmoid(log_odds.detach()).sum()
        metrics["log_odds_chosen"] = log_odds.detach().sum()
        metrics["nll"] = -l_c.sum()
        return losses.sum(), metrics

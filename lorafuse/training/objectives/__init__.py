"""Training objectives: files the loop calls (see base.py for the interface), picked by `train.objective`."""

from __future__ import annotations

from lorafuse.training.objectives.base import Objective, ObjectiveContext, evaluate
from lorafuse.training.objectives.dpo import DPOObjective
from lorafuse.training.objectives.orpo import ORPOObjective
from lorafuse.training.objectives.sft import SFTObjective

__all__ = ["Objective", "ObjectiveContext", "build_objective", "evaluate"]


def build_objective(tc) -> Objective:
    """The objective of a TrainConfig (`train.objective` and its settings)."""
    if tc.objective == "dpo":
        return DPOObjective(beta=tc.beta, loss=tc.dpo_loss, reference=tc.dpo_reference, shared_prompt=tc.shared_prompt)
    if tc.objective == "orpo":
        return ORPOObjective(lam=tc.orpo_lambda, shared_prompt=tc.shared_prompt)
    return SFTObjective()

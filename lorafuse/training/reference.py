"""DPO's reference model at the start of a run (`train.dpo_reference`), set up by the job before the first step.

live: the reference is this model with its adapter switched off (lorafuse.training.objectives.dpo). At a fresh start
    `check_live_reference` makes sure the switched-off model is the one training starts from (every LoRA B zero),
    before accel changes the model; a resume skips the check (B is rightly non-zero then).
precomputed: at a fresh start, each data set row's summed response log-probability under the model as it starts
    (adapter on, dropout off, prepared as training runs it) is computed once over the training and validation sets,
    in data set order, by every rank (`precompute_reference_logps` over an unsharded, unshuffled Batcher of the same
    pairs). The arrays are attached to the data sets (`dataset.ref_logps`: the Batchers hand each batch its rows'
    values), written to `<output.dir>/reference_logps.safetensors`, and saved with every checkpoint; a resume reads
    the checkpoint's instead of recomputing them from the trained adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from lorafuse.atomic import write_atomic
from lorafuse.data.collate import Batcher
from lorafuse.errors import LorafuseError
from lorafuse.training.checkpoint import REFERENCE_FILE
from lorafuse.training.objectives.dpo import check_live_reference, precompute_reference_logps


def check_start(objective, model, fresh: bool) -> None:
    """At a fresh start with a live DPO reference: the adapter switched off is the model training starts from."""
    if fresh and getattr(objective, "reference", None) == "live":
        check_live_reference(model)


def precomputed(objective, model, ctx, batchers: dict, saved: dict | None, fresh: bool, out: Path | None, note):
    """With a precomputed DPO reference: the log-probs ({"train": (rows,), "val": (rows,)} float32) attached to the
    Batchers' data sets and returned for the checkpoints; None for any other objective or reference.

    `batchers`: {"train": Batcher, "val": Batcher | None}; `saved`: what the resumed checkpoint holds; `out`: the run
    folder to write them to (None: a rank that writes no files).
    """
    if getattr(objective, "reference", None) != "precomputed":
        return None
    batchers = {name: b for name, b in batchers.items() if b is not None}
    logps = saved
    if logps is None:
        if not fresh:
            note(
                "the checkpoint holds no precomputed reference log-probs (it was trained with another "
                "train.dpo_reference): computing them from the model as this resume starts"
            )
        logps = {
            name: precompute_reference_logps(model, _in_order(b), ctx, len(b.dataset), objective)
            for name, b in batchers.items()
        }
        if out is not None:
            write_atomic(out / REFERENCE_FILE, save({k: torch.from_numpy(v) for k, v in logps.items()}))
    for name, b in batchers.items():
        if name not in logps or len(logps[name]) != len(b.dataset):
            raise LorafuseError(
                f"the checkpoint's precomputed reference log-probs do not cover the {name} data's {len(b.dataset)} "
                "rows: the data changed since the run started",
                "resume with the data the run started with, or start over with --no-resume",
            )
        b.dataset.ref_logps = logps[name]
    return logps


def _in_order(batcher: Batcher) -> Batcher:
    """The Batcher's pairs, unsharded and unshuffled (every row once, in data set order)."""
    return Batcher(
        batcher.dataset,
        batcher.micro_batch_size,
        batcher.pad_id,
        max_length=batcher.max_length,
        shuffle=False,
        pad_to_multiple_of=batcher.pad_to_multiple_of,
        pairs=True,
    )

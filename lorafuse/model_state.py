"""What lorafuse knows about a model it loaded or changed: one object on the model, `model_state(model)`.

    base:  how the base was loaded (name_or_path, quant, compute_dtype, blocksize, ...): model/load.py, random_init.py
    lora:  the adapter's settings once LoRA is applied (r, alpha, targets, ...): model/inject.py
    accel: what the runtime changed for speed or memory while the model trains (lorafuse.accel.AccelState), or None
    tokens: the trainable token rows of the embedding and head (lorafuse.lora.token_rows.TokenRowsState), or None
    prompt: how the adapter was trained to be prompted (lorafuse.model.prompt_format.PromptFormat): set by the
           train job, load_adapter, and load_model for a merged folder; generate and chat render with it

Adapter files, merges and the training job read these facts instead of guessing them from the modules. The object
lives in the model instance's __dict__ under one name, so transformers' modules carry nothing else of ours. This
module imports nothing of lorafuse: every package that loads, changes or saves a model reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_ATTR = "lorafuse_state"


@dataclass
class ModelState:
    base: dict = field(default_factory=dict)
    lora: dict | None = None
    accel: Any = None
    tokens: Any = None
    prompt: Any = None


def model_state(model) -> ModelState:
    """The model's ModelState, created empty on first use."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = model.__dict__[_ATTR] = ModelState()
    return state

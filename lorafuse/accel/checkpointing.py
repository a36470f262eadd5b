"""Gradient checkpointing as lorafuse runs it: non-reentrant, the recompute marked, some layers kept out.

Non-reentrant (`use_reentrant=False`): no per-step warning, correct with frozen inputs (no
`enable_input_require_grads` needed), and it recomputes only what backward needs. The transformers 5 name
`activation_checkpointing_enable` is used where it exists. The layer's forward runs inside
`kernels._runtime.checkpointed_forward()` and its recompute inside `recomputing()`, so the fused MLP may overwrite
its own intermediates in the first and leaves out the down projection in the second (kernels/swiglu_mlp.py).

`train.uncheckpointed_layers: N` takes the last N decoder layers out of checkpointing (transformers 5 checks each
layer's own `gradient_checkpointing` flag at every call): they save their activations, a third of their compute
saved for ~0.2 GiB each at a 7B's 2048 tokens.
"""

from __future__ import annotations

import functools

from torch import nn

from lorafuse.kernels._runtime import checkpointed_forward, recomputing


def recompute_contexts():
    """torch.utils.checkpoint's `context_fn`: the forward (whose saved tensors the checkpoint drops), the recompute."""
    return checkpointed_forward(), recomputing()


def checkpoint_kwargs(preserve_rng_state: bool = True) -> dict:
    """torch.utils.checkpoint's arguments for a decoder layer: non-reentrant, the forward and recompute marked."""
    return {"use_reentrant": False, "preserve_rng_state": preserve_rng_state, "context_fn": recompute_contexts}


def checkpoint_function(preserve_rng_state: bool = True):
    """The checkpoint with `checkpoint_kwargs` (a decoder layer's `_gradient_checkpointing_func`)."""
    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, **checkpoint_kwargs(preserve_rng_state))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder stack's layers (transformers' `base_model.layers`), [] for a model without one."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def enable(model: nn.Module) -> bool:
    """Turn checkpointing on for every decoder layer; False when the model does not support it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    kwargs = checkpoint_kwargs()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def disable(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def keep_activations(model: nn.Module, n: int) -> int:
    """Take the last `n` decoder layers out of checkpointing; returns how many layers that was."""
    layers = decoder_layers(model)
    kept = [layer for layer in layers[max(0, len(layers) - n) :] if hasattr(layer, "gradient_checkpointing")]
    for layer in kept:
        layer.gradient_checkpointing = False
    return len(kept)


def without_rng(model: nn.Module, function=None) -> None:
    """Checkpointed layers stop saving/restoring torch's RNG state: what a CUDA graph capture needs, and exact when
    nothing in the layers draws from torch's generators (the fast path's dropout draws from a device seed).
    `function`: the checkpoint function to install (activation offload passes its own)."""
    plain = function or checkpoint_function(preserve_rng_state=False)
    for mod in model.modules():
        if getattr(mod, "_gradient_checkpointing_func", None) is not None:
            mod._gradient_checkpointing_func = plain

"""The one place that changes a loaded model for speed or memory: `prepare(model, options) -> AccelState`, `restore`.

prepare, in order (each step prints one line when it changes something or cannot):
    1. trainable tensors in fp32 (16-bit masters round small AdamW steps away; GradScaler refuses 16-bit grads),
       the KV cache off; a trained input embedding (lora.modules_to_save) still hands the decoder its 16-bit dtype
       (an fp32 embedding output would run the whole residual stream in fp32, and the fused kernels refuse it)
    2. gradient checkpointing (checkpointing.py; `offload`: layer inputs in pinned host memory, offload.py), the
       last `uncheckpointed_layers` layers kept out of it
    3. the input embedding in pinned host memory (host_tables.py)
    4. the fused kernels swapped in (fast_path.py), with the run's KernelOptions; train.fp8 checked against the card,
       the compute dtype and the fast path (plan/policy.py decides, as the planner does)
    5. the output head in pinned host memory between losses (host_tables.py)
restore undoes 2-5 (the fp32 masters stay: they are the trained weights).

The model carries the result as `model_state(model).accel` (lorafuse.model_state): one object, no attributes on
transformers' modules. The loss, the CUDA graphs and the loop read what they need from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorafuse.accel import checkpointing
from lorafuse.accel.fast_path import FastPath, apply_fast_path, fast_path_blocker, remove_fast_path
from lorafuse.accel.host_tables import (
    HeadStage,
    embeddings_to_device,
    embeddings_to_host,
    head_to_device,
    head_to_host,
    simple_head,
)
from lorafuse.errors import LorafuseError
from lorafuse.kernels import _runtime
from lorafuse.model_state import model_state
from lorafuse.options import Options
from lorafuse.plan import policy


@dataclass
class AccelState:
    """What `prepare` changed on one model, and what the training loop reads from it."""

    options: Options
    params: list  # the trainable Parameters (fp32)
    checkpointing: bool = False
    kept_layers: int = 0
    offload_layers: int = 0
    fast: FastPath | None = None
    head: nn.Linear | None = None  # the output head the loss reads as a weight (None: the model's logits)
    host_embedding: torch.Tensor | None = None  # the pinned table (the device alias does not own it)
    head_stage: HeadStage | None = None
    hooks: list = field(default_factory=list)  # forward hooks to remove on restore (offload, head stage)
    embedding_dtype: torch.dtype | None = None  # the dtype a trained (fp32) input embedding's output is cast to

    @property
    def fused_loss(self) -> bool:
        """The fused cross-entropy kernel may run: a plain head and the fast path on CUDA."""
        return self.head is not None and self.fast is not None and self.fast.ops.name == "triton"


def accel_state(model) -> AccelState | None:
    return model_state(model).accel


def prepare(model: nn.Module, options: Options, note=print) -> AccelState:
    """Prepare `model` for training under `options` (see the module docstring); idempotent per model."""
    if accel_state(model) is not None:
        restore(model)
    params = _fp32_masters(model, note)
    state = AccelState(options, params)
    model_state(model).accel = state
    try:
        _embedding_output(model, state, note)
        _checkpointing(model, state, note)
        if options.embeddings_on_host:
            state.host_embedding, why = embeddings_to_host(model)
            size = 0 if state.host_embedding is None else state.host_embedding.nbytes
            note(
                f"input embedding in pinned host memory, read in place: {size / 2**30:.2f} GiB of GPU memory freed"
                if size
                else f"input embedding stays on the device: {why}"
            )
        state.head = simple_head(model)
        _fast_path(model, state, note)
        if options.head_on_host:
            _head_to_host(model, state, note)
    except BaseException:
        restore(model)
        raise
    return state


def restore(model: nn.Module) -> None:
    """Undo `prepare` (the fp32 masters stay)."""
    state = accel_state(model)
    if state is None:
        return
    if state.fast is not None:
        remove_fast_path(model, state.fast)
    if state.head_stage is not None:
        head_to_device(model, state.head_stage, [])
    for hook in state.hooks:
        hook.remove()
    if state.host_embedding is not None:
        embeddings_to_device(model, state.host_embedding)
    if state.checkpointing:
        checkpointing.disable(model)
    model_state(model).accel = None


def _fp32_masters(model: nn.Module, note) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LorafuseError(
            "the model has no trainable parameters", "apply LoRA first: lorafuse.apply_lora(model, r=16, ...)"
        )
    low = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    for p in low:
        p.data = p.data.float()
    if low:
        note(f"trainable tensors upcast to float32: {len(low)} (16-bit masters lose small updates)")
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return params


def _embedding_output(model: nn.Module, state: AccelState, note) -> None:
    """A trained input embedding (fp32 master) in a 16-bit decoder: its output cast to the decoder's dtype, as a
    frozen 16-bit embedding gives it; the cast's backward hands the master an fp32 gradient."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = _decoder_dtype(model)
    if embedding is None or dtype is None or not embedding.weight.requires_grad or embedding.weight.dtype == dtype:
        return
    state.embedding_dtype = dtype
    state.hooks.append(embedding.register_forward_hook(lambda module, args, out: out.to(dtype)))
    note(f"the trained input embedding's output is cast to {dtype} (its master is float32)")


def _decoder_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the first decoder layer computes in: an NF4 layer's compute dtype, else its first frozen
    floating-point weight's dtype (None: no decoder layers found, or nothing frozen in them)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return None
    for module in layers[0].modules():
        if isinstance(getattr(module, "compute_dtype", None), torch.dtype):
            return module.compute_dtype
    frozen = (p.dtype for p in layers[0].parameters() if not p.requires_grad and p.is_floating_point())
    return next(frozen, None)


def _checkpointing(model: nn.Module, state: AccelState, note) -> None:
    opts = state.options
    if not opts.gradient_checkpointing:
        return
    if not checkpointing.enable(model):
        note(f"{type(model).__name__} does not support gradient checkpointing; training without it")
        return
    state.checkpointing = True
    if opts.uncheckpointed_layers:
        state.kept_layers = checkpointing.keep_activations(model, opts.uncheckpointed_layers)
        note(f"the last {state.kept_layers} decoder layers save their activations (no recompute in backward)")
    if opts.gradient_checkpointing == "offload":
        from lorafuse.accel.offload import install

        state.offload_layers, hook = install(model)
        state.hooks.append(hook)
        note(f"activation offload: the inputs of {state.offload_layers} checkpointed layers wait in pinned CPU memory")


def _fast_path(model: nn.Module, state: AccelState, note) -> None:
    """train.fast_path (auto | on | off) and train.fp8, which runs inside the fused kernels only."""
    opts, kernel = state.options, state.options.kernel
    device = state.params[0].device  # the trainable tensors live on the compute device
    why = ""
    if opts.fast_path == "off":
        why = "train.fast_path is off"
    elif device.type != "cuda" and opts.fast_path == "auto":
        why = f"the model is on {device.type}, the fused kernels need a CUDA GPU"
    else:
        state.fast, why = apply_fast_path(model, kernel)
        if state.fast is None and opts.fast_path == "on":
            raise LorafuseError(
                f"train.fast_path is 'on' but the fast path cannot apply: {why}",
                "set train.fast_path=auto (falls back to the PyTorch path) or fix the cause above",
            )
        if state.fast is None:
            note(f"fast path off: {why}")
    if kernel.fp8:
        _check_fp8(model, state, device, why)
    if kernel.dequant_cap_bytes and state.fast is not None:
        note(f"NF4 weights over {kernel.dequant_cap_bytes >> 20} MiB in 16 bits are dequantized in row parts")


def _card(device: torch.device) -> tuple[tuple[int, int] | None, str]:
    """(compute capability or None without CUDA, the card's name) of the compute device."""
    if device.type != "cuda":
        return None, device.type
    return torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)


def _check_fp8(model: nn.Module, state: AccelState, device: torch.device, fused_why: str) -> None:
    capability, card = _card(device)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    bf16 = emb is not None and emb.weight.dtype == torch.bfloat16
    why = policy.fp8_blocker(capability, card, bf16, state.fast is not None and _runtime.HAS_TRITON, fused_why)
    if why:
        raise LorafuseError(
            f"train.fp8 is on, but {why}",
            "set train.fp8: false (the bf16 GEMMs are the default); FP8 needs an Ada or Hopper GPU, "
            "model.compute_dtype: bfloat16 and train.fast_path: auto with a Llama, Mistral or Qwen2/3 model",
        )


def _head_to_host(model: nn.Module, state: AccelState, note) -> None:
    stage, hooks, why = head_to_host(model)
    state.head_stage = stage
    state.hooks.extend(hooks)
    note(
        "output head in pinned host memory, streamed to the loss in ~32 MiB vocabulary chunks where that takes less "
        f"memory than staging it whole: {stage.host.nbytes / 2**30:.2f} GiB off the backward's peak"
        if stage is not None
        else f"output head stays on the device: {why}"
    )


__all__ = ["AccelState", "accel_state", "fast_path_blocker", "prepare", "restore"]

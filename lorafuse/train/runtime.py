"""What the loop needs from the device and the process: precision policy, model preparation, stop signals.

Precision: on CUDA, autocast to the compute dtype (bf16; fp16 with a GradScaler, since fp16 gradients underflow
without loss scaling); nothing on CPU in fp32. Trainable tensors are fp32 masters whatever the compute dtype: a
16-bit master rounds small AdamW steps away, and GradScaler refuses to unscale fp16 gradients.

Gradient checkpointing is the non-reentrant kind (`use_reentrant=False`): no per-step warning, correct with
frozen inputs (no `enable_input_require_grads` needed), and it recomputes only what backward needs. The
transformers 5 name `activation_checkpointing_enable` is used where it exists. The recompute runs inside
`kernels._runtime.recomputing()` (`checkpoint_function`), so the fused MLP leaves out the down projection there.

Signals: SIGTERM/SIGINT set a flag the loop checks after each optimizer step (it then saves and returns); a
second SIGINT raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import functools
import signal
import threading
from contextlib import nullcontext

import torch
from torch import nn

from lorafuse.errors import LorafuseError


class Precision:
    """Autocast + GradScaler policy for one compute dtype on one device."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.amp = dtype in (torch.bfloat16, torch.float16)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.amp else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def prepare_model(
    model,
    gradient_checkpointing: bool | str,
    note=print,
    embeddings_on_host: bool = False,
    head_on_host: bool = False,
    uncheckpointed_layers: int = 0,
    dequant_cap_mib: int = 0,
    fp8: bool = False,
) -> list[nn.Parameter]:
    """Checkpointing on (non-reentrant; "offload": layer inputs in pinned CPU memory, train/offload.py), cache
    off, trainable tensors in fp32, optionally the input embedding in pinned host memory
    (model/host_embedding.py) and the output head there between losses; returns the trainable params."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LorafuseError(
            "the model has no trainable parameters", "apply LoRA first: lorafuse.apply_lora(model, r=16, ...)"
        )
    low = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    for p in low:
        p.data = p.data.float()  # fp32 masters: a 16-bit update rounds small steps away; GradScaler needs fp32
    if low:
        note(f"trainable tensors upcast to float32: {len(low)} (16-bit masters lose small updates)")
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            note(f"{type(model).__name__} does not support gradient checkpointing; training without it")
        else:
            kwargs = checkpoint_kwargs()
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if uncheckpointed_layers and getattr(model, "supports_gradient_checkpointing", False):
            kept = keep_activations(model, uncheckpointed_layers)
            note(f"the last {kept} decoder layers save their activations (no recompute in backward)")
        if gradient_checkpointing == "offload" and getattr(model, "supports_gradient_checkpointing", False):
            from lorafuse.train.offload import install

            note(f"activation offload: the inputs of {install(model)} checkpointed layers wait in pinned CPU memory")
    if embeddings_on_host:
        from lorafuse.model.host_embedding import embeddings_to_host

        moved, reason = embeddings_to_host(model)
        note(
            f"input embedding in pinned host memory, read in place: {moved / 2**30:.2f} GiB of GPU memory freed"
            if moved
            else f"input embedding stays on the device: {reason}"
        )
    from lorafuse.kernels import lora_linear

    # read by every fused linear from now on; 0 restores the default (LORAFUSE_DEQUANT_CAP_MIB, else none)
    lora_linear.DEQUANT_CAP_BYTES = (dequant_cap_mib << 20) or lora_linear.ENV_DEQUANT_CAP_BYTES
    if dequant_cap_mib:
        note(f"NF4 weights over {dequant_cap_mib} MiB in 16 bits are dequantized and multiplied in row parts")
    _set_fp8(model, params[0].device, fp8, note)  # trainable tensors live on the compute device
    if head_on_host:
        from lorafuse.model.host_embedding import head_to_host

        moved, reason = head_to_host(model)
        note(
            f"output head in pinned host memory, streamed to the loss in ~32 MiB vocabulary chunks where that "
            f"takes less memory than staging it whole: {moved / 2**30:.2f} GiB off the backward's peak"
            if moved
            else f"output head stays on the device: {reason}"
        )
    return params


def _set_fp8(model, device: torch.device, wanted: bool, note) -> None:
    """train.fp8: the fused linears' base GEMMs in FP8 from now on (kernels/fp8.py), where the card and the
    compute dtype allow; a clear error where they do not. Off restores the default (LORAFUSE_FP8, else off)."""
    from lorafuse.kernels import fp8

    fp8.ENABLED = fp8.ENV_ENABLED
    if not wanted:
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    ref = (
        emb.weight
        if emb is not None
        else next((p for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    )
    dtype = ref.dtype if ref is not None else None  # the compute dtype is the embedding's
    if reason := fp8.supported(device):
        raise LorafuseError(f"train.fp8 is on, but {reason}", "set train.fp8: false (the bf16 GEMMs are the default)")
    if dtype != torch.bfloat16:
        raise LorafuseError(
            f"train.fp8 needs bf16 compute, the model computes in {dtype}",
            "set model.compute_dtype: bfloat16, or train.fp8: false",
        )
    fp8.ENABLED = True
    note(
        "FP8 (e4m3) base-weight GEMMs in the forward and the recompute"
        + ("" if not fp8.BACKWARD else ", and the backward's input gradient of NF4 weights")
        + "; LoRA and the loss in bf16"
    )


def fp8_needs_fast_path(model, fast_path: str) -> None:
    """train.fp8 runs inside the fused kernels only: without the fast path it would change nothing, so it stops
    instead of letting the run look faster than it is (train/api.py turns FP8 back off after the loop, either way)."""
    if getattr(model, "lorafuse_fast_path", None):
        return
    from lorafuse.kernels.fast_path import fast_path_blocker

    why = (
        "train.fast_path is off"
        if fast_path == "off"
        else f"the fast path did not apply ({fast_path_blocker(model) or 'it runs on CUDA only'})"
    )
    raise LorafuseError(
        f"train.fp8 is on, but {why}; FP8 runs inside the fused kernels only",
        "set train.fast_path: auto (a Llama, Mistral or Qwen2/3 model on an NVIDIA GPU), or train.fp8: false",
    )


def recompute_contexts():
    """torch.utils.checkpoint's `context_fn`: `checkpointed_forward()` around the forward, whose saved tensors the
    checkpoint drops, and `recomputing()` around the recompute (kernels/_runtime.py)."""
    from lorafuse.kernels._runtime import checkpointed_forward, recomputing

    return checkpointed_forward(), recomputing()


def checkpoint_kwargs(preserve_rng_state: bool = True) -> dict:
    """torch.utils.checkpoint's arguments for a decoder layer: non-reentrant, the forward and recompute marked."""
    return {"use_reentrant": False, "preserve_rng_state": preserve_rng_state, "context_fn": recompute_contexts}


def checkpoint_function(preserve_rng_state: bool = True):
    """The checkpoint with `checkpoint_kwargs` (a decoder layer's `_gradient_checkpointing_func`)."""
    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, **checkpoint_kwargs(preserve_rng_state))


def keep_activations(model, n: int) -> int:
    """Take the last `n` decoder layers out of gradient checkpointing (transformers 5 checks each layer's own
    `gradient_checkpointing` flag at every call); returns how many layers that was."""
    from lorafuse.model.host_embedding import decoder_layers

    layers = decoder_layers(model)
    kept = [layer for layer in layers[max(0, len(layers) - n) :] if hasattr(layer, "gradient_checkpointing")]
    for layer in kept:
        layer.gradient_checkpointing = False
    return len(kept)


class StopSignals:
    """SIGTERM/SIGINT set a flag (checked after each step); a second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

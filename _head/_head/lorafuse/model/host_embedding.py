"""Frozen vocabulary tables in pinned host memory: the input embedding, read by the GPU in place
(`train.embeddings_on_host`), and the output head, staged on the device for each loss (`train.head_on_host`).

A LoRA or QLoRA run never trains the input embedding, and a forward reads only the rows of its micro-batch's
tokens: 4 x 512 tokens of a 4096-wide model are 16 MiB, while the table is vocab x hidden x 2 bytes (0.24 GiB for
Llama-2-7B, 0.98 GiB for Llama-3-8B's 128k vocabulary, 1 GiB for Qwen2.5-7B). So the table moves to pinned
(page-locked) host memory and the GPU's embedding kernel gathers its rows over PCIe, with no copy step:

  * pinned memory from cudaHostAlloc is mapped into every device's address space at the same address
    (unified virtual addressing, every 64-bit CUDA platform), so a CUDA tensor can alias it;
  * the alias is made with the `__cuda_array_interface__` protocol (shape, int16 element type, pointer), then
    viewed as the weight's dtype; torch's allocator never sees it, so it costs no GPU memory at all;
  * the Parameter object stays the same (only `.data` changes): optimizers, hooks and state_dict keys are
    untouched, and a state_dict read copies the rows like any CUDA tensor.

The embedding lookup is then a plain CUDA kernel whose loads cross PCIe: about 16 MiB per micro-step at
4 x 512 tokens, well under a millisecond on PCIe 4/5, and a CUDA graph records it like any other kernel.

Not moved (a one-line reason each): a table that is trained (`modules_to_save: [embed_tokens]`), a table tied to
the output head (the head's GEMM reads all of it every step), a model that is not on a CUDA device.

The output head is different: the loss's GEMMs read all of it, several times per step, so reading it over PCIe in
place would be slow. But only the loss reads it, and the fused loss forms its gradients in the forward, so the
head is needed from the end of the forward to the end of the loss and never in the backward, where a checkpointed
step's memory peaks. `head_to_host` keeps it in pinned memory (the Parameter aliased there, so generation and a
logits forward still work, reading it in place); `HeadStage` copies it to the device on a side stream from the
middle decoder layer of each training forward on (vocab x hidden x 2 bytes: 0.24 GiB for Llama-2-7B, about 5 ms
on PCIe 5, overlapped with the forward's second half) and the loss takes the copy, which is freed when the loss
returns. The planner counts it in the loss phase (`plan.memory.host_head`). Not moved: a trained head, a head
tied to the input embedding, a loss that needs the model's own logits (soft-capping, scaling, a LoRA head).
"""

from __future__ import annotations

import torch
from torch import nn

_INT_VIEW = {2: (torch.int16, "<i2"), 4: (torch.int32, "<i4")}


class _DeviceView:
    """`__cuda_array_interface__` of a pinned host tensor (kept alive here for as long as the alias lives)."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": _INT_VIEW[host.element_size()][1],
                                         "data": (host.data_ptr(), False), "version": 2, "strides": None}


def device_alias(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor on `device` that reads and writes the pinned, contiguous host tensor `host` in place."""
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("device_alias needs a pinned, contiguous host tensor")
    view = torch.as_tensor(_DeviceView(host.view(_INT_VIEW[host.element_size()][0])), device=device)
    return view.view(host.dtype)


def host_embedding_blocker(model: nn.Module) -> str:
    """Why the input embedding cannot move to host memory ("" when it can)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return "the model has no nn.Embedding input table"
    w = emb.weight
    if w.requires_grad:
        return "the input embedding is trained (modules_to_save)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is w:
        return "the input embedding is tied to the output head, which reads all of it every step"
    return _placement_blocker(w, "input embedding")


def _placement_blocker(w: torch.Tensor, what: str) -> str:
    if w.element_size() not in _INT_VIEW:
        return f"the {what} is {w.dtype}"
    if not w.is_cuda:
        return "the model is not on a CUDA device"
    return ""


def _to_pinned(w: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Move the frozen Parameter w's bytes to pinned host memory, w itself aliasing them on its device (the same
    Parameter object: only `.data` changes). Returns (the pinned tensor, which the caller keeps alive, "") or
    (None, why not) with w untouched."""
    try:
        host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
        host.copy_(w.detach())
        alias = device_alias(host, w.device)
    except (RuntimeError, ValueError, TypeError) as exc:  # no pinned memory, or no mapping of it on this platform
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return None, f"pinned host memory could not be mapped for the GPU here ({first})"
    w.data = alias
    torch.cuda.synchronize(w.device)
    torch.cuda.empty_cache()
    return host, ""


def embeddings_to_host(model: nn.Module) -> tuple[int, str]:
    """Move the frozen input embedding to pinned host memory, aliased on its device. Returns (bytes moved, reason
    when nothing moved). Idempotent."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(emb, "lorafuse_host_weight", None) is not None:
        return 0, "the input embedding is already in host memory"
    reason = host_embedding_blocker(model)
    if reason:
        return 0, reason
    host, reason = _to_pinned(emb.weight)
    if host is None:
        return 0, reason
    emb.lorafuse_host_weight = host  # keeps the pinned block alive (the alias does not own it)
    return host.numel() * host.element_size(), ""


def embeddings_to_device(model: nn.Module) -> None:
    """Undo `embeddings_to_host`: the table back in device memory."""
    emb = model.get_input_embeddings()
    host = getattr(emb, "lorafuse_host_weight", None)
    if host is None:
        return
    emb.weight.data = host.to(emb.weight.device)
    del emb.lorafuse_host_weight


# --- the output head: in host memory between losses, staged on the device for each one (`train.head_on_host`) ---


def host_head_blocker(model: nn.Module) -> str:
    """Why the output head cannot live in host memory between losses ("" when it can)."""
    from lorafuse.train.loss import simple_head

    head = simple_head(model)
    if head is None:
        return "the loss does not read the head as a plain bias-free weight (it needs the model's own logits)"
    w = head.weight
    if w.requires_grad:
        return "the output head is trained (modules_to_save)"
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is w:
        return "the output head is tied to the input embedding, which every forward reads"
    return _placement_blocker(w, "output head")


class HeadStage:
    """A device copy of a frozen head that lives only from the middle of a training forward to the end of its loss.

    `prefetch()` allocates the copy on the current stream and fills it from pinned host memory on a side stream
    (the PCIe copy overlaps the second half of the forward); `take()` makes the current stream wait for it and
    hands it over, so it is freed as soon as the loss drops it, before the backward (where the step's memory
    peaks) begins. Both record into a CUDA graph like any other work: fork and join are stream waits, the copy is
    from pinned memory. Without a prefetch (evaluation, a forward under no_grad), `take()` copies in stream order.
    The head is frozen, so a copy left by an abandoned forward is still valid and the next loss takes it."""

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device = host, device
        self.pending: torch.Tensor | None = None
        self.armed = False
        self._stream: torch.cuda.Stream | None = None

    def prefetch(self) -> None:
        if self.pending is not None:
            return
        main = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        buf = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # on main: freed there
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            buf.copy_(self.host, non_blocking=True)
        self.pending = buf

    def take(self) -> torch.Tensor:
        if self.pending is None:
            return self.host.to(self.device, non_blocking=True)
        buf, self.pending = self.pending, None
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return buf


def _arm(stage: HeadStage):
    def hook(module, args, kwargs):
        stage.armed = module.training and torch.is_grad_enabled()  # not generation, not evaluation
    return hook


def _fire(stage: HeadStage):
    def hook(module, args):
        if stage.armed:  # the stack's own forward, not the checkpoint's recompute inside the backward
            stage.armed = False
            stage.prefetch()
    return hook


def head_to_host(model: nn.Module) -> tuple[int, str]:
    """Move the frozen output head to pinned host memory. Between losses it costs no GPU memory; the loss reads a
    device copy staged during the forward (`HeadStage`); anything else (generation, a logits forward) reads the
    host table in place through a device alias. Returns (bytes moved, reason when nothing moved). Idempotent."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(head, "lorafuse_head_stage", None) is not None:
        return 0, "the output head is already in host memory"
    reason = host_head_blocker(model)
    if reason:
        return 0, reason
    host, reason = _to_pinned(head.weight)
    if host is None:
        return 0, reason
    stage = HeadStage(host, head.weight.device)
    layers = decoder_layers(model)
    hooks = [model.base_model.register_forward_pre_hook(_arm(stage), with_kwargs=True)]
    if layers:
        hooks.append(layers[len(layers) // 2].register_forward_pre_hook(_fire(stage)))
    head.lorafuse_head_stage, head.lorafuse_head_hooks = stage, hooks  # the stage keeps the pinned block alive
    return host.numel() * host.element_size(), ""


def head_to_device(model: nn.Module) -> None:
    """Undo `head_to_host`: the head back in device memory (e.g. before long generation)."""
    head = model.get_output_embeddings()
    stage = getattr(head, "lorafuse_head_stage", None)
    if stage is None:
        return
    for h in head.lorafuse_head_hooks:
        h.remove()
    head.weight.data = stage.host.to(head.weight.device)
    del head.lorafuse_head_stage, head.lorafuse_head_hooks


def head_weight(head: nn.Module) -> torch.Tensor:
    """The weight a loss should read: the staged device copy of a head in host memory, else the weight itself."""
    stage = getattr(head, "lorafuse_head_stage", None)
    return head.weight if stage is None else stage.take()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder stack's layers (transformers' `base_model.layers`), [] for a model without one."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []

"""The frozen input embedding in pinned host memory, read by the GPU in place (`train.embeddings_on_host`).

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
    if w.element_size() not in _INT_VIEW:
        return f"the input embedding is {w.dtype}"
    if not w.is_cuda:
        return "the model is not on a CUDA device"
    return ""


def embeddings_to_host(model: nn.Module) -> tuple[int, str]:
    """Move the frozen input embedding to pinned host memory, aliased on its device. Returns (bytes moved, reason
    when nothing moved). Idempotent."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(emb, "lorafuse_host_weight", None) is not None:
        return 0, "the input embedding is already in host memory"
    reason = host_embedding_blocker(model)
    if reason:
        return 0, reason
    w = emb.weight
    try:
        host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
        host.copy_(w.detach())
        alias = device_alias(host, w.device)
    except (RuntimeError, ValueError, TypeError) as exc:  # no pinned memory, or no mapping of it on this platform
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return 0, f"pinned host memory could not be mapped for the GPU here ({first})"
    emb.lorafuse_host_weight = host  # keeps the pinned block alive (the alias does not own it)
    w.data = alias
    torch.cuda.synchronize(w.device)
    torch.cuda.empty_cache()
    return host.numel() * host.element_size(), ""


def embeddings_to_device(model: nn.Module) -> None:
    """Undo `embeddings_to_host`: the table back in device memory."""
    emb = model.get_input_embeddings()
    host = getattr(emb, "lorafuse_host_weight", None)
    if host is None:
        return
    emb.weight.data = host.to(emb.weight.device)
    del emb.lorafuse_host_weight

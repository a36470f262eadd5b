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
returns. Where the loss's fp32 (tokens, hidden) state is smaller than the head (4 x 512 tokens: 32 MiB against
0.24 GiB), the head streams instead, in ~32 MiB vocabulary chunks, three of them in flight
(kernels/streamed_head.py): the loss and the forward's second half then hold those chunks, not the table. The
planner counts either (`plan.placement`). Not moved: a trained head, a head tied to the input embedding, a loss
that needs the model's own logits (soft-capping, scaling, a LoRA head).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafuse.accel.checkpointing import decoder_layers
from lorafuse.lora.token_rows import head_rows
from lorafuse.plan import policy

_INT_VIEW = {2: (torch.int16, "<i2"), 4: (torch.int32, "<i4")}


class _DeviceView:
    """`__cuda_array_interface__` of a pinned host tensor (kept alive here for as long as the alias lives)."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": _INT_VIEW[host.element_size()][1],
            "data": (host.data_ptr(), False),
            "version": 2,
            "strides": None,
        }


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


def embeddings_to_host(model: nn.Module) -> tuple[torch.Tensor | None, str]:
    """Move the frozen input embedding to pinned host memory, aliased on its device. Returns (the pinned table,
    which the caller keeps alive: the alias does not own it; or None and the reason nothing moved)."""
    reason = host_embedding_blocker(model)
    if reason:
        return None, reason
    return _to_pinned(model.get_input_embeddings().weight)


def embeddings_to_device(model: nn.Module, host: torch.Tensor) -> None:
    """Undo `embeddings_to_host`: the table back in device memory."""
    emb = model.get_input_embeddings()
    emb.weight.data = host.to(emb.weight.device)


# --- the output head: in host memory between losses, staged on the device for each one (`train.head_on_host`) ---


def simple_head(model) -> nn.Linear | None:
    """The output head when logits are exactly `hidden @ W^T` (else None: the loss uses the model's logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or getattr(model, "base_model", model) is model:
        return None
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits"):
        if getattr(cfg, attr, None) not in (None, False, 1, 1.0):
            return None
    return head


def host_head_blocker(model: nn.Module) -> str:
    """Why the output head cannot live in host memory between losses ("" when it can)."""
    head = simple_head(model)
    if head is None:
        return "the loss does not read the head as a plain bias-free weight (it needs the model's own logits)"
    w = head.weight
    if w.requires_grad:
        return "the output head is trained (modules_to_save)"
    if head_rows(model) is not None:
        return "the output head has trainable token rows (lora.train_untrained_tokens, data.add_special_tokens)"
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
    The head is frozen, so a copy left by an abandoned forward is still valid and the next loss takes it.

    Streamed (`streams(rows)`, kernels/streamed_head.py): the head comes in vocabulary chunks of about
    CHUNK_BYTES instead, `ahead` of them copied during the forward and each later one issued as an earlier one is
    consumed, so at most `ahead` chunks are on the device. The loss then reads the label rows W[y] in place
    through `alias`, the Parameter's device view of the pinned table. It is chosen when its state, (rows, hidden)
    fp32, is smaller than the whole head (measured on an H200 at 4 x 512 tokens: no slower than staging it whole).
    A head staged whole stays possible for a stage made without `alias`."""

    CHUNK_BYTES = policy.HEAD_CHUNK_BYTES
    AHEAD = policy.HEAD_AHEAD

    def __init__(self, host: torch.Tensor, device: torch.device, alias: torch.Tensor | None = None):
        self.host, self.device, self.alias = host, device, alias
        self.pending: torch.Tensor | None = None
        self.queue: list[tuple[int, torch.Tensor, torch.cuda.Event]] = []  # streamed chunks in flight
        self.armed = False
        self.streaming = alias is not None
        self._stream: torch.cuda.Stream | None = None
        vocab, width = host.shape
        self.chunk_rows = max(1, min(vocab, self.CHUNK_BYTES // (width * host.element_size())))
        self.n_chunks = -(-vocab // self.chunk_rows)

    def streams(self, rows: int) -> bool:
        """Does a loss over `rows` tokens stream the head in chunks (its fp32 (rows, hidden) state is smaller
        than the head)?"""
        return self.streaming and policy.head_streams(rows, self.host.shape[1], self.host.nbytes)

    def _side(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def _issue(self, i: int) -> None:
        """Copy chunk i on the side stream into a buffer allocated on the current stream (freed there), after all
        work queued there so far (which includes the last reader of any block the allocator hands out again)."""
        main = torch.cuda.current_stream(self.device)
        v0 = i * self.chunk_rows
        src = self.host[v0 : v0 + self.chunk_rows]
        buf = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        side, done = self._side(), torch.cuda.Event()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            buf.copy_(src, non_blocking=True)
            done.record(side)
        self.queue.append((i, buf, done))

    def _issue_first(self) -> None:
        """The first AHEAD chunks, those not already in flight."""
        for i in range(len(self.queue), min(self.AHEAD, self.n_chunks)):
            self._issue(i)

    def prefetch(self, rows: int | None = None) -> None:
        """Start the copies for the next loss over `rows` tokens (unknown: the whole head)."""
        if rows is not None and self.streams(rows):
            self._issue_first()
            return
        if self.pending is not None:
            return
        main = torch.cuda.current_stream(self.device)
        buf = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # on main: freed there
        side = self._side()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            buf.copy_(self.host, non_blocking=True)
        self.pending = buf

    def chunks(self):
        """(first row, device chunk) over the vocabulary in order, for one loss. Chunks prefetched by the forward
        come first; each chunk's buffer is dropped before the one `ahead` of it is issued."""
        main = torch.cuda.current_stream(self.device)
        self.pending = None  # a whole copy staged for a loss that streams after all
        if self.queue and self.queue[0][0] != 0:  # left by a loss that stopped part way
            self.queue.clear()
        self._issue_first()
        for i in range(self.n_chunks):
            j, buf, done = self.queue.pop(0)
            assert j == i, f"head chunk {j} arrived where {i} was expected"
            main.wait_event(done)
            yield i * self.chunk_rows, buf
            del buf
            if i + self.AHEAD < self.n_chunks:
                self._issue(i + self.AHEAD)

    def target_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """W[labels] (rows, hidden), gathered from the pinned table in place."""
        return torch.nn.functional.embedding(labels, self.alias)

    def take(self) -> torch.Tensor:
        self.queue.clear()  # chunks staged for a loss that takes the whole head after all
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
    def hook(module, args, kwargs=None):
        if stage.armed:  # the stack's own forward, not the checkpoint's recompute inside the backward
            stage.armed = False
            x = args[0] if args else (kwargs or {}).get("hidden_states")
            stage.prefetch(x.shape[:-1].numel() if torch.is_tensor(x) else None)

    return hook


def head_to_host(model: nn.Module) -> tuple[HeadStage | None, list, str]:
    """Move the frozen output head to pinned host memory. Between losses it costs no GPU memory; the loss reads a
    device copy staged during the forward (`HeadStage`); anything else (generation, a logits forward) reads the
    host table in place through a device alias. Returns (the stage, which keeps the pinned block alive; the hooks
    that arm and fire it; "") or (None, [], the reason nothing moved)."""
    reason = host_head_blocker(model)
    if reason:
        return None, [], reason
    head = model.get_output_embeddings()
    host, reason = _to_pinned(head.weight)
    if host is None:
        return None, [], reason
    stage = HeadStage(host, head.weight.device, alias=head.weight.data)
    layers = decoder_layers(model)
    hooks = [model.base_model.register_forward_pre_hook(_arm(stage), with_kwargs=True)]
    if layers:
        hooks.append(layers[len(layers) // 2].register_forward_pre_hook(_fire(stage), with_kwargs=True))
    return stage, hooks, ""


def head_to_device(model: nn.Module, stage: HeadStage, hooks: list) -> None:
    """Undo `head_to_host`: the head back in device memory."""
    for h in hooks:
        h.remove()
    head = model.get_output_embeddings()
    head.weight.data = stage.host.to(head.weight.device)

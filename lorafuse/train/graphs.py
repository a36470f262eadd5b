"""CUDA graphs for a micro-batch's forward + backward: one graph replay instead of thousands of launches.

Why: a profiled Llama-2-7B QLoRA step on an H200 (4 x 512 tokens, benchmarks/NOTES.md) kept the GPU busy
about 0.16 s of a 0.36-0.40 s step. The rest was the host: Python in the autograd Functions, a few thousand
kernel launches (224 LoRA linears, each with its rank-r GEMMs, forward, recompute and backward). A replay
launches the whole recorded forward + backward at once, so the step becomes GPU-bound.

How (`GraphedMicroStep`):
  1. Micro-batches run eagerly (they are real training steps) until one shape has been seen `warmup` times
     and makes up at least half of the micro-batches so far: Triton autotuning, cuBLAS workspaces and lazily
     sized buffers (the NF4 dequantize buffer) settle in those steps. Packed or fixed-length rows qualify at
     once; rows padded to each batch's longest rarely do, and then nothing is captured (a note says so):
     a graph's memory pool for a shape that seldom comes back would cost memory for no speed.
  2. The next micro-batch of that shape is captured: static input tensors, `loss_sum = loss_fn(batch)` under autocast (its cast
     cache off, as capture requires), backward of `loss_sum * inv_n` with `inv_n` a static scalar that the
     caller sets before each replay (token-normalised accumulation). Gradients exist before capture (zeros
     where missing), so the recorded backward ACCUMULATES into the same .grad tensors: accumulation over
     micro-batches works, and the caller must zero gradients in place (`zero_grad(set_to_none=False)`).
  3. Every later micro-batch of that shape copies its tensors into the static inputs and replays. A batch of
     another shape runs eagerly (one graph per run: its private memory pool holds the step's activations).
Anything the capture cannot record (a host synchronisation inside the model, a kernel that cannot be
captured) turns graphs off for the run with a one-line reason; that micro-batch runs eagerly, nothing lost.

Conditions (`graph_blocker`): CUDA; the fused fast path applied (its kernels are capture-safe; the fused
loss switches to a fixed-shape pass while capturing, kernels/cross_entropy.py); LoRA dropout only through the
fast path's device-side seeds (kernels/fast_path.py: a per-module offset on a base the decoder stack advances
on the device at each forward, so every replay draws new masks and a recompute regenerates the forward's);
one process (the multi-GPU gradient all-reduce rebinds gradients); no activation offload. Gradient
checkpointing stays on; its RNG bookkeeping is turned off for the captured layers, which is exact because
nothing in them draws from torch's generators (the dropout masks come from the device seed).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def graph_blocker(model: nn.Module, device: torch.device, world_size: int = 1) -> str | None:
    """Why the forward + backward cannot be captured (one line), or None when it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not getattr(model, "lorafuse_fast_path", None):
        return "CUDA graphs need the fused fast path (train.fast_path)"
    if getattr(model, "lorafuse_offload", 0):
        return "CUDA graphs are not combined with activation offload (train.gradient_checkpointing: offload)"
    if world_size > 1:
        return "CUDA graphs are single-process for now (multi-GPU runs launch eagerly)"
    for name, mod in model.named_modules():
        drop = getattr(mod, "dropout", None)
        if hasattr(mod, "lora_A") and isinstance(drop, nn.Dropout) and drop.p > 0 \
                and getattr(mod, "lorafuse_dropout_seed", None) is None:
            return (f"LoRA dropout {drop.p} on {name} without a device-side seed: a graph would replay one "
                    "dropout mask (set lora.dropout: 0 for CUDA graphs)")
    return None


def _batch_key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(batch.items()) if torch.is_tensor(v))


def _checkpoint_without_rng(model: nn.Module) -> None:
    """Checkpointed layers stop saving/restoring RNG state (nothing random runs in them: see the docstring)."""
    from torch.utils.checkpoint import checkpoint

    plain = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    for mod in model.modules():
        if getattr(mod, "_gradient_checkpointing_func", None) is not None:
            mod._gradient_checkpointing_func = plain


class GraphedMicroStep:
    """`step(batch, inv_n) -> loss_sum` (fp32 scalar; gradients of loss_sum * inv_n accumulated into .grad).

    `loss_fn(batch) -> loss_sum` runs the model (called under autocast here); `backward(loss)` is the
    precision policy's backward (GradScaler scaling for fp16). See the module docstring for the protocol.
    """

    def __init__(self, model: nn.Module, params: list, loss_fn, backward, dtype: torch.dtype, warmup: int = 2,
                 note=print):
        self.model, self.params, self.loss_fn, self.backward = model, params, loss_fn, backward
        self.dtype, self.warmup, self.note = dtype, warmup, note
        self.key = None
        self.counts: dict = {}
        self.seen = 0
        self.waiting_noted = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.disabled: str | None = None
        self.static: dict = {}
        self.loss: torch.Tensor | None = None
        self.inv_n: torch.Tensor | None = None
        self.replays = 0

    def _autocast(self, cache: bool = True):
        return torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=cache)

    def eager(self, batch: dict, inv_n: float, fixed: bool = True) -> torch.Tensor:
        """One micro-batch without a graph; `fixed`: the loss's fixed-shape pass, as a capture records it."""
        from lorafuse.kernels.cross_entropy import fixed_shape

        with self._autocast(), fixed_shape(fixed):
            loss_sum = self.loss_fn(batch)
        self.backward(loss_sum * inv_n)
        return loss_sum.detach()

    def __call__(self, batch: dict, inv_n: float) -> torch.Tensor:
        key = _batch_key(batch)
        if self.disabled or (self.key is not None and key != self.key):
            return self.eager(batch, inv_n, fixed=False)
        if self.graph is None:
            self.seen += 1
            count = self.counts[key] = self.counts.get(key, 0) + 1
            if count <= self.warmup or 2 * count < self.seen:
                if self.seen == 50 and not self.waiting_noted:
                    self.waiting_noted = True
                    self.note("CUDA graphs waiting: micro-batch shapes keep changing (padding to each batch's "
                              "longest row); set data.packing: true for fixed shapes and the graph speed-up")
                return self.eager(batch, inv_n, fixed=2 * count >= self.seen)  # a likely capture: warm its path
            if not self._capture(batch, key):
                return self.eager(batch, inv_n, fixed=False)
        for k, v in batch.items():
            if torch.is_tensor(v):
                self.static[k].copy_(v, non_blocking=True)
        self.inv_n.fill_(inv_n)
        self.graph.replay()
        self.replays += 1
        return self.loss.clone()

    def _capture(self, batch: dict, key: tuple) -> bool:
        from lorafuse.kernels.cross_entropy import fixed_shape

        for p in self.params:  # the recorded backward must accumulate into these, never rebind .grad
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _checkpoint_without_rng(self.model)
        self.static = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        self.inv_n = torch.ones((), dtype=torch.float32, device=self.params[0].device)
        grads = [p.grad for p in self.params]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back before the graph's pool is reserved
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                with self._autocast(cache=False), fixed_shape():
                    loss = self.loss_fn(self.static)
                self.backward(loss * self.inv_n)
                loss = loss.detach()
        except Exception as exc:  # a host sync or an uncapturable op inside the model: eager from now on
            self.disabled = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            self.note(f"CUDA graphs off: capturing the step failed ({self.disabled}); running eagerly")
            self.static, self.inv_n = {}, None
            torch.cuda.synchronize()
            return False
        if any(p.grad is not g for p, g in zip(self.params, grads)):
            self.disabled = "a gradient tensor was rebound during capture"
            self.note(f"CUDA graphs off: {self.disabled}; running eagerly")
            return False
        self.graph, self.loss, self.key = graph, loss, key
        shape = tuple(batch["input_ids"].shape) if torch.is_tensor(batch.get("input_ids")) else key[0][1]
        self.note(f"CUDA graphs on: forward + backward of {shape} micro-batches replayed as one graph")
        return True


def for_loop(loop):
    """The training loop's GraphedMicroStep (or None, with the reason noted): its model, precision and loss."""
    from lorafuse.train.loss import lm_loss_sum

    blocker = graph_blocker(loop.model, loop.device, loop.world.size)
    if blocker:
        loop._note(f"CUDA graphs off: {blocker}")
        return None
    model, head, fused = loop.model, loop.head, loop.fused
    return GraphedMicroStep(model, loop.params, lambda b: lm_loss_sum(model, b, head, fused),
                            loop.precision.backward, loop.precision.dtype, note=loop._note)


def dropout_seed_base(seed: int, rank: int, grad_accum: int, step: int) -> int:
    """The fast path's dropout seed base at an optimizer step (each micro-batch's forward then adds 1): from the
    seed and the rank, so ranks draw different masks and a resumed run draws an uninterrupted run's."""
    from lorafuse.kernels.reference import mix32

    stride = 256 if grad_accum < 256 else 1 << grad_accum.bit_length()
    return (mix32((seed * 1_000_003 + rank) & 0xFFFFFFFF) + step * stride) % 2**32


def set_dropout_seed(model: nn.Module, value: int) -> None:
    """Set the fast path's dropout seed base (kernels/fast_path.py); a no-op without the fast path."""
    base = getattr(getattr(model, "model", None), "lorafuse_dropout_base", None)
    if base is not None:
        base.fill_(int(value))

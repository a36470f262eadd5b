"""Activation offload: gradient checkpointing whose saved layer inputs wait in pinned CPU memory.

`train.gradient_checkpointing: offload`. With plain checkpointing each decoder layer keeps its input on the GPU
until its backward (c D bytes per token per layer: 0.5 GiB for a 7B at 2,048 tokens, 4 GiB at 16k). Here the
input is copied to pinned host memory instead, and the GPU copy is freed:

    forward   y = layer(x) without autograd; x -> pinned CPU on a side stream, overlapping the next layer's
              compute. x's GPU block is released one layer later, after the compute stream has waited for the
              copy's event (so no allocation can reuse it while the copy still reads it).
    backward  x <- CPU: fetched on the side stream one layer ahead (layer i's backward prefetches layer i-1's
              input), then y = layer(x) again with autograd, and backward through it: gradients for x and for
              every trainable tensor the layer used.

Capture-safe, so it combines with CUDA graphs (training/graphs.py): the host buffers come from a pool of
page-locked blocks (`cudaHostRegister` on plain CPU tensors, never freed, reused in the same order every
micro-step), so a capture allocates no host memory and a replay writes the same addresses. The pool holds one
set of L buffers per distinct micro-batch shape: with padded data, up to 8 shapes' worth of host memory. The side
stream is forked and joined with events, and nothing calls `record_stream` (whose deferred frees would keep every
layer's input alive until the end of a capture).

What stays on the GPU per layer: nothing but what autograd holds for the Function (the output's metadata).
The cost is PCIe traffic of 2 c D bytes per token per layer per micro-step (about 30 ms a step for a 7B at
4 x 512 tokens over 16 GB/s, mostly hidden behind compute) and the host memory itself; the planner
(`lorafuse plan`) prices both.

The backward recomputes under the forward's autocast state and RNG state (CPU, and CUDA for the layer's
device), as torch.utils.checkpoint does, so dropout masks match; with `preserve_rng_state=False` (what the graph
capture installs: the fast path's dropout draws from a device seed, not from torch's generators) it skips that.
It is the reentrant scheme: a dummy input that requires grad keeps the Function in the graph even when x does
not (the first layer's input comes from a frozen embedding). Installed per layer as transformers'
`_gradient_checkpointing_func` (`install`), so the model code is untouched; on a CPU tensor the "offload" keeps
the tensor as it is (the tests' path).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorafuse.kernels._runtime import recomputing

_SIDE_STREAMS: dict = {}
_LAST: dict = {}  # device index -> the newest _Stash (the one whose GPU input is still held, and the prefetch chain)


def _side_stream(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


class PinnedPool:
    """Page-locked host buffers by (shape, dtype), handed out and given back, never freed: the addresses a CUDA
    graph recorded stay valid, and steady-state micro-steps allocate nothing."""

    def __init__(self):
        self.free: dict = {}
        self.bytes = 0

    def take(self, shape, dtype) -> torch.Tensor:
        stack = self.free.setdefault((tuple(shape), dtype), [])
        if stack:
            return stack.pop()
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "activation offload needs a new host buffer during a CUDA graph capture "
                "(the warm-up steps should have made it)"
            )
        buf = torch.empty(shape, dtype=dtype)
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed ({err}): cannot pin host memory for activation offload")
        self.bytes += buf.numel() * buf.element_size()
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.free[(tuple(buf.shape), buf.dtype)].append(buf)


POOL = PinnedPool()


def drop_stale(*_args) -> None:
    """Forward pre-hook of the offloaded model: a previous forward whose backward never ran (an out-of-memory
    error, an interrupted step) leaves its stashes behind; give their buffers back before this one starts."""
    for key, stash in list(_LAST.items()):
        compute = torch.cuda.current_stream(stash.device)
        while stash is not None:
            stash.release(compute)
            if stash.data is not None and stash.event is not None:
                compute.wait_event(stash.event)
                POOL.give(stash.data)
                stash.data = None
            stash.ready, nxt, stash.prev = None, stash.prev, None
            stash = nxt
        del _LAST[key]


class _Stash:
    """One layer input in pinned host memory (CUDA) or kept as is (CPU)."""

    def __init__(self, x: torch.Tensor):
        self.device, self.event, self.held, self.ready, self.prev = x.device, None, None, None, None
        if not x.is_cuda:
            self.data = x.detach()
            return
        key = x.device.index
        compute, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        prev = _LAST.get(key)
        if prev is not None:
            prev.release(compute)
            self.prev = prev if prev.data is not None else None
        _LAST[key] = self
        self.data = POOL.take(x.shape, x.dtype)
        side.wait_stream(compute)  # x is complete before the copy starts
        with torch.cuda.stream(side):
            self.data.copy_(x.detach(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(side)
        self.held = x  # freed by release(): after the compute stream has waited for the copy

    def release(self, compute) -> None:
        if self.held is not None:
            compute.wait_event(self.event)
            self.held = None

    def prefetch(self) -> None:
        """Start the host -> device copy on the side stream (layer i's backward does it for layer i-1)."""
        if self.ready is not None or self.data is None or self.event is None:
            return
        compute, side = torch.cuda.current_stream(self.device), _side_stream(self.device)
        dst = torch.empty(self.data.shape, dtype=self.data.dtype, device=self.device)  # a compute-stream block
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            side.wait_event(self.event)
            dst.copy_(self.data, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        self.ready = (dst, done)

    def fetch(self) -> torch.Tensor:
        if self.event is None:
            return self.data
        compute = torch.cuda.current_stream(self.device)
        self.release(compute)
        self.prefetch()
        dst, done = self.ready
        compute.wait_event(done)  # also orders the buffer's reuse (the next forward's copy) after this read
        POOL.give(self.data)
        self.data, self.ready = None, None
        if _LAST.get(self.device.index) is self:
            del _LAST[self.device.index]
        if self.prev is not None and self.prev.data is not None:
            self.prev.prefetch()  # the next backward's input, behind this layer's recompute and backward
        self.prev = None
        return dst


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, preserve_rng, anchor, x, *rest):
        ctx.run, ctx.rest = run, rest
        ctx.x_grad = x.requires_grad
        ctx.autocast = [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu")]
        ctx.cpu_rng = torch.get_rng_state() if preserve_rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda and preserve_rng else None
        with torch.no_grad():
            out = run(x, *rest)
        ctx.stash = _Stash(x)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.stash.fetch().detach().requires_grad_(ctx.x_grad)
        ctx.stash = None
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.cpu_rng is not None), torch.enable_grad():
            if ctx.cpu_rng is not None:
                torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with (
                torch.autocast("cuda", enabled=ctx.autocast[0][1], dtype=ctx.autocast[0][2]),
                torch.autocast("cpu", enabled=ctx.autocast[1][1], dtype=ctx.autocast[1][2]),
                recomputing(),
            ):
                out = ctx.run(x, *ctx.rest)  # recomputing(): the fused MLP skips its down GEMM (output unused)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, x.grad if ctx.x_grad else None) + (None,) * len(ctx.rest)


def offload_checkpoint(function, *args, preserve_rng_state: bool = True, **_checkpoint_kwargs):
    """transformers' `_gradient_checkpointing_func` contract: function(*args) with args[0] the hidden states.
    `preserve_rng_state=False`: the recompute does not restore torch's RNG state (nothing in the layer draws
    from it; what a CUDA graph capture installs)."""
    x, rest = args[0], args[1:]
    if any(torch.is_tensor(a) and a.requires_grad for a in rest):
        raise ValueError("activation offload differentiates only the layer's first input")
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _OffloadedLayer.apply(function, preserve_rng_state, anchor, x, *rest)


def install(model: nn.Module):
    """Route every checkpointed layer of `model` through `offload_checkpoint`. Returns (how many layers, the
    model's forward pre-hook that drops a stale stash: remove it to undo)."""
    try:  # transformers 5: each decoder layer checkpoints itself
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older: the backbone calls its own function on each layer
        GradientCheckpointingLayer = nn.Module
    n = 0
    for mod in model.modules():
        if getattr(mod, "_gradient_checkpointing_func", None) is not None:
            mod._gradient_checkpointing_func = offload_checkpoint
            # layers kept out of the checkpoints (train.uncheckpointed_layers) never call it
            n += isinstance(mod, GradientCheckpointingLayer) and getattr(mod, "gradient_checkpointing", True)
    return n, model.register_forward_pre_hook(drop_stale)


offload_without_rng = functools.partial(offload_checkpoint, preserve_rng_state=False)  # for a graph capture

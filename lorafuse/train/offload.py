"""Activation offload: gradient checkpointing whose saved layer inputs wait in pinned CPU memory.

`train.gradient_checkpointing: offload`. With plain checkpointing each decoder layer keeps its input on the GPU
until its backward (c D bytes per token per layer: 0.5 GiB for a 7B at 2,048 tokens, 4 GiB at 16k). Here the
input is copied to pinned host memory instead, and the GPU copy is freed:

    forward   y = layer(x) without autograd; x -> pinned CPU on a side stream (overlapping the next layers'
              compute; the GPU block is not reused until the copy is done: `record_stream`)
    backward  x <- CPU on the compute stream (after the copy's event), y = layer(x) again with autograd,
              backward through it: gradients for x and for every trainable tensor the layer used

What stays on the GPU per layer: nothing but what autograd holds for the Function (the output's metadata).
The cost is PCIe traffic of 2 c D bytes per token per layer per micro-step (about 30 ms a step for a 7B at
4 x 512 tokens over 16 GB/s) and the host memory itself; the planner (`lorafuse plan`) prices both.

The backward recomputes under the forward's autocast state and RNG state (CPU, and CUDA for the layer's
device), as torch.utils.checkpoint does, so dropout masks match. It is the reentrant scheme: a dummy input
that requires grad keeps the Function in the graph even when x does not (the first layer's input comes from a
frozen embedding). Installed per layer as transformers' `_gradient_checkpointing_func` (`install`), so the
model code is untouched; on a CPU tensor the "offload" keeps the tensor as it is (the tests' path).
"""

from __future__ import annotations

import torch
from torch import nn

_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


class _Stash:
    """One layer input in pinned host memory (CUDA) or kept as is (CPU)."""

    def __init__(self, x: torch.Tensor):
        self.device, self.event = x.device, None
        if not x.is_cuda:
            self.data = x.detach()
            return
        self.data = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream = _side_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before the copy starts
        with torch.cuda.stream(stream):
            self.data.copy_(x.detach(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        x.record_stream(stream)  # the caching allocator keeps x's block until the copy is done

    def fetch(self) -> torch.Tensor:
        if self.event is None:
            return self.data
        torch.cuda.current_stream(self.device).wait_event(self.event)
        return self.data.to(self.device, non_blocking=True)


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, anchor, x, *rest):
        ctx.run, ctx.rest = run, rest
        ctx.x_grad = x.requires_grad
        ctx.autocast = [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                        for dev in ("cuda", "cpu")]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            out = run(x, *rest)
        ctx.stash = _Stash(x)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.stash.fetch().detach().requires_grad_(ctx.x_grad)
        ctx.stash = None
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.autocast("cuda", enabled=ctx.autocast[0][1], dtype=ctx.autocast[0][2]), \
                    torch.autocast("cpu", enabled=ctx.autocast[1][1], dtype=ctx.autocast[1][2]):
                out = ctx.run(x, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, x.grad if ctx.x_grad else None) + (None,) * len(ctx.rest)


def offload_checkpoint(function, *args, **_checkpoint_kwargs):
    """transformers' `_gradient_checkpointing_func` contract: function(*args) with args[0] the hidden states."""
    x, rest = args[0], args[1:]
    if any(torch.is_tensor(a) and a.requires_grad for a in rest):
        raise ValueError("activation offload differentiates only the layer's first input")
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _OffloadedLayer.apply(function, anchor, x, *rest)


def install(model: nn.Module) -> int:
    """Route every checkpointed layer of `model` through `offload_checkpoint`; returns how many layers."""
    try:  # transformers 5: each decoder layer checkpoints itself
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older: the backbone calls its own function on each layer
        GradientCheckpointingLayer = nn.Module
    n = 0
    for mod in model.modules():
        if getattr(mod, "_gradient_checkpointing_func", None) is not None:
            mod._gradient_checkpointing_func = offload_checkpoint
            n += isinstance(mod, GradientCheckpointingLayer)
    model.lorafuse_offload = max(n, 1)
    return n

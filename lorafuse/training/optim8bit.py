"""8-bit AdamW and paged 8-bit AdamW: the update of lorafuse.training.optim's AdamW with block-wise 8-bit states.

8-bit states (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", bitsandbytes' layout):
m and v are stored as one uint8 code per element plus one fp32 absmax per block of 256 elements. A code
indexes a 256-entry "dynamic" map: signed for m (values in [-1, 1]), unsigned for v (v >= 0 uses all 256
codes for [0, 1], one more bit of precision). The dynamic map spends its codes on a log scale (an exponent
made of leading zero bits, then a linear fraction), so small values inside a block keep ~2-3 significant
digits even when the block's absmax is 1000x larger. Each step dequantizes a block to fp32
(`code[q] * absmax`), applies the update above in fp32, then re-quantizes: absmax = max|x| of the block and
q = the nearest map entry to x / absmax (lorafuse.training.blockwise).

Block size 256, not 2048: bitsandbytes uses 2048 for weight quantization but 256 for optimizer states (see
`bitsandbytes/optim/optimizer.py`, `blocksize = 256`). A smaller block isolates outliers better: one large
gradient only coarsens its own 256 neighbours. The cost is one fp32 absmax per 256 elements per state:
4/256 = 0.016 extra bytes per element, so two states take 2.03 bytes/element instead of 8 (3.94x smaller).
Parameters with fewer than `min_8bit_size` (4096) elements keep fp32 states, as bitsandbytes does: their
memory is negligible and biases/norm scales are where quantization noise hurts most.

Dtype policy: states are uint8 + fp32 absmax (or fp32 for small params); the update is computed in fp32 and
written back into the parameter's dtype (LoRA weights are fp32 masters). Work is done in chunks of
`_CHUNK_BLOCKS` blocks so the fp32 temporaries stay bounded for large parameters.

Paged (`PagedAdamW8bit`): on CUDA, when the states would crowd the GPU (more than 5% of the card, or less than
10% left free; `host_states=True` forces it), the states of every parameter live in pinned CPU memory. At each
step a parameter's states are copied to the GPU on a side stream, updated there, and copied back on the side
stream; the copy for parameter i+1 is issued before the update of parameter i, so transfers overlap the update
kernels. Trade-off: GPU memory for optimizer states drops to one parameter's worth, paid for with
2 x (state bytes) of PCIe traffic and thousands of small copies per step. Measured on an H200 (Llama-2-7B QLoRA,
448 LoRA tensors, batch 4 x 512): always-paged states with the PyTorch update took 0.727 s a step; states on the GPU
with the fused kernel below, 0.363 s (the two changes were not measured apart). The states are ~80 MB there, hence
the pressure rule (bitsandbytes' unified-memory pages also move only under pressure). On CPU, paged == 8-bit.

On CUDA with 256-blocks the update is fused (`lorafuse.kernels.adamw8bit`): the device-resident parameters of a
param_group that share a device, a dtype, a gradient dtype and a step count are updated by ONE Triton launch (448
launches a step become one for a 7B QLoRA run); the others (non-contiguous, other dtypes, a group of one, paged
states) by one launch per parameter. Both give bit-identical results. The PyTorch code below is the reference
and the CPU path.

A step the device may cancel (`step(apply=flag)`, the training loop's skip of a non-finite step without a host
synchronisation): the fused kernels read the 0-dim flag and store nothing where it is False; the PyTorch paths
update copies and keep the old values where it is False (lorafuse.training.readback.kept_unless). Each state's step
counter advances at once and is taken back when the next step (or state_dict) reads the flag, by then computed
long ago (readback.CancelledSteps), so every update uses the counters of a run that never took the cancelled step.
"""

from __future__ import annotations

import math
import os

import torch

from lorafuse.training.blockwise import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise
from lorafuse.training.readback import CancelledSteps, kept_unless

MIN_8BIT_SIZE = 4096
_CHUNK_BLOCKS = 4096  # 1M elements per fp32 temporary


def _adamw_fp32(p, g, m, v, step, lr, b1, b2, eps, wd):
    """One AdamW update in place on fp32 tensors p, m, v (g fp32). Same math as bitsandbytes' kernels."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    if wd:
        p.mul_(1 - lr * wd)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**step))


def _kernels_may_run(t: torch.Tensor) -> bool:
    """Whether the fused kernels may take `t`: CUDA tensors, or CPU tensors under Triton's interpreter (the kernel
    tests; `lorafuse.kernels._runtime.use_triton` decides there). A CPU run skips their checks altogether."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit m and v (module docstring); `paged=True` keeps states in pinned host memory."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = MIN_8BIT_SIZE,
        blocksize: int = BLOCKSIZE,
        paged: bool = False,
        host_states: bool | None = None,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit arguments lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.blocksize = blocksize
        self.paged = paged
        self.host_states = host_states  # paged only: None = decide by GPU memory pressure at the first step
        self._maps: dict[tuple, torch.Tensor] = {}
        self._copy_stream = None
        self._tables = None  # LaunchTables of the multi-tensor launches, made at the first one
        self._cancelled = CancelledSteps()  # counters of a flagged step, until its flag is read

    def _map(self, signed: bool, device) -> torch.Tensor:
        key = (signed, str(device))
        if key not in self._maps:
            self._maps[key] = dynamic_map(signed).to(device)
        return self._maps[key]

    def _paged_on(self, p) -> bool:
        if not (self.paged and p.is_cuda):
            return False
        if self.host_states is None:
            self.host_states = self._under_pressure(p.device)
        return self.host_states

    def _under_pressure(self, device) -> bool:
        """Page the states out to host memory only when keeping them on the GPU would crowd it.

        Like bitsandbytes' paged optimizers (unified memory that moves only under pressure), states stay on the GPU
        while they are small next to it: LoRA states of a 7B model are ~80 MB, and shuttling them over PCIe every
        step would cost more time than the memory is worth. They go to pinned host memory when they would take more
        than 5% of the card, or leave less than 10% of it free.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.is_cuda]
        need = sum(2.04 * p.numel() if p.numel() >= self.min_8bit_size else 8 * p.numel() for p in params)
        free, total = torch.cuda.mem_get_info(device)
        return need > 0.05 * total or free - need < 0.10 * total

    def _init_state(self, p) -> dict:
        # Paged states are created in pinned host memory; the others beside their parameter.
        kw = dict(device="cpu", pin_memory=True) if self._paged_on(p) else dict(device=p.device)
        n = p.numel()
        if n < self.min_8bit_size:
            return {
                "step": 0,
                "m": torch.zeros(n, dtype=torch.float32, **kw),
                "v": torch.zeros(n, dtype=torch.float32, **kw),
            }
        blocks = -(-n // self.blocksize)
        # absmax 0 makes every code decode to 0, so the codes' initial value does not matter.
        return {
            "step": 0,
            "m_q": torch.zeros(n, dtype=torch.uint8, **kw),
            "m_absmax": torch.zeros(blocks, **kw),
            "v_q": torch.zeros(n, dtype=torch.uint8, **kw),
            "v_absmax": torch.zeros(blocks, **kw),
        }

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None):
        """One update of every parameter with a gradient. `apply`: a 0-dim bool tensor on the parameters' device
        (the training loop's "this step's loss and gradient norm are finite"); where it is False every parameter and
        state keeps its value and the step counters are taken back, without the host reading it now (module
        docstring)."""
        self._cancelled.settle()  # the previous step's counters, before this step's bias corrections use them
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            work = [p for p in group["params"] if p.grad is not None]
            for p in work:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                if not self.state[p]:
                    self.state[p] = self._init_state(p)
            groups.append((group, work))
        if apply is not None:
            self._cancelled.record(apply, [self.state[p] for _, work in groups for p in work])
        for group, work in groups:
            paged = [p for p in work if self._paged_on(p)]
            for p in self._multi_tensor([p for p in work if not self._paged_on(p)], group, apply):
                self._update(p, self.state[p], group, apply)
            if paged:
                self._paged_updates(paged, group, apply)
        if self._tables is not None:
            self._tables.prune()
        return loss

    def _multi_tensor(self, params: list, group: dict, apply: torch.Tensor | None = None) -> list:
        """Update the 8-bit parameters that can share a fused launch, one launch per (device, dtype, grad dtype,
        step); return the parameters left for `_update`."""
        if self.blocksize != 256 or len(params) < 2 or not _kernels_may_run(params[0]):
            return params
        try:
            from lorafuse.kernels.adamw8bit import LaunchTables, adamw8bit_multi_update, multi_tensor_ok
        except ImportError:
            return params
        launches, rest = {}, []
        for p in params:
            g, state = p.grad, self.state[p]
            if "m_q" in state and multi_tensor_ok(p, g, state):
                launches.setdefault((p.device, g.device, p.dtype, g.dtype, state["step"]), []).append((p, g, state))
            else:
                rest.append(p)
        if self._tables is None:
            self._tables = LaunchTables()
        b1, b2 = group["betas"]
        for (device, *_, step), items in launches.items():
            ps, gs, states = zip(*items)
            if len(items) == 1 or not adamw8bit_multi_update(
                ps,
                gs,
                states,
                self._map(True, device),
                self._map(False, device),
                *self._bounds(device),
                step + 1,
                group["lr"],
                b1,
                b2,
                group["eps"],
                group["weight_decay"],
                self._tables,
                apply,
            ):
                rest += ps
                continue
            for state in states:
                state["step"] = step + 1
        return rest

    def _update(self, p, state: dict, group: dict, apply: torch.Tensor | None = None) -> None:
        """Update one parameter with its states `state` (tensors on p's device); `apply` as in `step`."""
        state["step"] += 1
        b1, b2 = group["betas"]
        args = (state["step"], group["lr"], b1, b2, group["eps"], group["weight_decay"])
        flat_p = p.data.view(-1) if p.data.is_contiguous() else p.data.reshape(-1).clone()
        flat_g = p.grad.reshape(-1)
        if "m" in state:
            with kept_unless(apply, [flat_p, state["m"], state["v"]]):
                p32 = flat_p.float()
                _adamw_fp32(p32, flat_g.float(), state["m"], state["v"], *args)
                flat_p.copy_(p32)
        else:
            self._update_8bit(flat_p, flat_g, state, args, apply)
        if not p.data.is_contiguous():
            p.data.copy_(flat_p.view_as(p))

    def _update_8bit(self, flat_p, flat_g, state, args, apply=None) -> None:
        bs = self.blocksize
        smap, umap = self._map(True, flat_p.device), self._map(False, flat_p.device)
        if bs == 256 and _kernels_may_run(flat_p) and self._fused(flat_p, flat_g, state, smap, umap, args, apply):
            return
        with kept_unless(apply, [flat_p, *(state[k] for k in ("m_q", "m_absmax", "v_q", "v_absmax"))]):
            self._reference_8bit(flat_p, flat_g, state, smap, umap, args)

    def _reference_8bit(self, flat_p, flat_g, state, smap, umap, args) -> None:
        """The PyTorch update of 8-bit states, in chunks (the CPU path, and the fused kernels' reference)."""
        bs = self.blocksize
        chunk = _CHUNK_BLOCKS * bs
        for start in range(0, flat_p.numel(), chunk):
            end = min(start + chunk, flat_p.numel())
            b0, b1_ = start // bs, -(-end // bs)
            m = dequantize_blockwise(state["m_q"][start:end], state["m_absmax"][b0:b1_], smap, bs)
            v = dequantize_blockwise(state["v_q"][start:end], state["v_absmax"][b0:b1_], umap, bs)
            p32 = flat_p[start:end].float()
            _adamw_fp32(p32, flat_g[start:end].float(), m, v, *args)
            flat_p[start:end].copy_(p32)
            state["m_q"][start:end], state["m_absmax"][b0:b1_] = quantize_blockwise(m, smap, bs)
            state["v_q"][start:end], state["v_absmax"][b0:b1_] = quantize_blockwise(v, umap, bs)

    def _fused(self, flat_p, flat_g, state, smap, umap, args, apply=None) -> bool:
        """The fused Triton update (lorafuse.kernels.adamw8bit): one launch per parameter instead of ~25; False
        where it cannot run (CPU tensors outside the interpreter tests)."""
        try:
            from lorafuse.kernels.adamw8bit import adamw8bit_update
        except ImportError:
            return False
        return adamw8bit_update(flat_p, flat_g, state, smap, umap, *self._bounds(flat_p.device), *args, apply=apply)

    def _bounds(self, device) -> tuple:
        """The midpoints of the signed and unsigned maps: the fused kernels' nearest-code boundaries."""
        from lorafuse.kernels.adamw8bit import midpoints

        key = ("bounds", str(device))
        if key not in self._maps:
            self._maps[key] = (
                midpoints(self._map(True, device)).contiguous(),
                midpoints(self._map(False, device)).contiguous(),
            )
        return self._maps[key]

    def _paged_updates(self, params: list, group: dict, apply: torch.Tensor | None = None) -> None:
        """Host states -> GPU (side stream, one parameter ahead) -> update -> back to host (side stream)."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=params[0].device)
        copy, main = self._copy_stream, torch.cuda.current_stream(params[0].device)

        def fetch(p):
            with torch.cuda.stream(copy):
                on_gpu = {
                    k: (v.to(p.device, non_blocking=True) if torch.is_tensor(v) else v)
                    for k, v in self.state[p].items()
                }
            return on_gpu, copy.record_event()

        pending = fetch(params[0])
        for i, p in enumerate(params):
            on_gpu, ready = pending
            if i + 1 < len(params):
                pending = fetch(params[i + 1])  # overlaps the update below
            main.wait_event(ready)
            for t in on_gpu.values():
                if torch.is_tensor(t):
                    t.record_stream(main)  # allocated on the copy stream, used on the main one
            self._update(p, on_gpu, group, apply)
            done = main.record_event()
            host = self.state[p]
            host["step"] = on_gpu["step"]
            with torch.cuda.stream(copy):
                copy.wait_event(done)
                for k, t in on_gpu.items():
                    if torch.is_tensor(t):
                        host[k].copy_(t, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """In place (`set_to_none=False`, a CUDA-graph step): one multi-tensor launch, not one fill per parameter
        (448 for Llama-2-7B's LoRA: ~0.9 ms of kernels and gaps a step on an H200, benchmarks/NOTES.md)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if set_to_none or any(g.grad_fn is not None for g in grads):  # gradients with history: torch's own way
            super().zero_grad(set_to_none=set_to_none)
        elif grads:
            torch._foreach_zero_(grads)

    def synchronize(self) -> None:
        """Wait for the copies of paged states back to host memory (before reading them, e.g. to save)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def state_dict(self):
        self._cancelled.settle()
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._cancelled.forget()
        # torch casts every floating state to its parameter's dtype and moves it to the parameter's device;
        # 8-bit states must keep fp32 absmax and, when paged, stay in pinned host memory. Restore them as saved.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if index not in saved:
                continue
            kw = dict(device="cpu") if self._paged_on(p) else dict(device=p.device)
            restored = {}
            for k, v in saved[index].items():
                if torch.is_tensor(v):
                    v = v.to(copy=True, **kw)
                    v = v.pin_memory() if self._paged_on(p) else v
                restored[k] = v
            self.state[p] = restored


class PagedAdamW8bit(AdamW8bit):
    """8-bit AdamW whose states live in pinned host memory on CUDA (see the module docstring)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, paged=True, **kwargs)

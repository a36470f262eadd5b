"""CUDA graphs for a micro-batch's forward + backward: one graph replay instead of thousands of launches.

Why: a profiled Llama-2-7B QLoRA step on an H200 (4 x 512 tokens, benchmarks/NOTES.md) kept the GPU busy
about 0.16 s of a 0.36-0.40 s step. The rest was the host: Python in the autograd Functions, a few thousand
kernel launches (224 LoRA linears, each with its rank-r GEMMs, forward, recompute and backward). A replay
launches the whole recorded forward + backward at once, so the step becomes GPU-bound.

How (`GraphedMicroStep`):
  1. Each shape's first `warmup` micro-batches run eagerly (they are real training steps): Triton autotuning,
     cuBLAS workspaces and lazily sized buffers (the NF4 dequantize buffer) settle in those steps. They run on
     the stream the captures use, so the captured GEMMs reuse their cuBLAS workspaces (cuBLAS keeps one per
     handle and stream: a capture on a stream of its own kept a second set, 64 MiB on an H200).
  2. Its next micro-batch is captured (up to MAX_GRAPHS shapes; all graphs share ONE memory pool, which is safe
     because nothing but the loss outlives a replay, and the loss is copied out at once): static input tensors,
     `loss_sum = loss_fn(batch)` under autocast (its cast cache off, as capture requires), backward of
     `loss_sum * inv_n` with `inv_n` a static scalar that the caller sets before each replay (token-normalised
     accumulation). Gradients exist before capture (zeros where missing), so the recorded backward ACCUMULATES
     into the same .grad tensors: accumulation over micro-batches works, and the caller must zero gradients in
     place (`zero_grad(set_to_none=False)`).
  3. Every later micro-batch of that shape copies its tensors into the static inputs and replays.
Shapes: packed rows have one; padded rows are padded to a multiple of 64 on CUDA (lorafuse/job.py), so a 512-token
run has at most 8 lengths. The Batcher's right-padded rows need no attention mask (data/collate.py); a batch that
does carry a (B, T) mask gets the (B, 1, T, T) bool mask SDPA takes as given (`prepare`), since transformers' 2-D
mask handling makes data-dependent checks a capture cannot record.
Anything the capture cannot record (a host synchronisation inside the model, a kernel that cannot be
captured) turns graphs off for the run with a one-line reason; that micro-batch runs eagerly, nothing lost.

Conditions (`graph_blocker`): CUDA; the fused fast path applied (its kernels are capture-safe; the fused
loss switches to a fixed-shape pass while capturing, kernels/cross_entropy.py); LoRA dropout only through the
fast path's device-side seeds (accel/fast_path.py: a per-module offset on a base the decoder stack advances
on the device at each forward, so every replay draws new masks and a recompute regenerates the forward's);
one process (the gradient all-reduce copies in place, but graphs have not been run across processes yet).
Gradient checkpointing stays on (activation offload too: its host buffers and side-stream copies are
capture-safe, accel/offload.py); its RNG bookkeeping is turned off for the captured layers, which is exact
because nothing in them draws from torch's generators (the dropout masks come from the device seed).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorafuse.accel import accel_state, checkpointing
from lorafuse.accel.offload import offload_without_rng
from lorafuse.lora.linear import LoRALinear
from lorafuse.training.loss import lm_loss_sum
from lorafuse.training.objectives.base import ObjectiveContext


def graph_blocker(model: nn.Module, device: torch.device, world_size: int = 1) -> str | None:
    """Why the forward + backward cannot be captured (one line), or None when it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    state = accel_state(model)
    fast = None if state is None else state.fast
    if fast is None:
        return "CUDA graphs need the fused fast path (train.fast_path)"
    if world_size > 1:
        return "CUDA graphs are single-process for now (multi-GPU runs launch eagerly)"
    for name, mod in model.named_modules():
        drop = getattr(mod, "dropout", None)
        if isinstance(mod, LoRALinear) and isinstance(drop, nn.Dropout) and drop.p > 0 and mod not in fast.seeds:
            return (
                f"LoRA dropout {drop.p} on {name} without a device-side seed: a graph would replay one "
                "dropout mask (set lora.dropout: 0 for CUDA graphs)"
            )
    return None


def _loss_of(out: torch.Tensor) -> torch.Tensor:
    """The loss sum in a loss function's output: the scalar itself, or a vector's first element."""
    return out if out.dim() == 0 else out[0]


def _batch_key(batch: dict) -> tuple:
    """What a capture depends on: each tensor's shape, dtype and device, and each plain int (a shared-prompt
    batch's `pair_split` sets a slice width, which a capture records as it finds it)."""
    return tuple(
        (k, tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else (k, v)
        for k, v in sorted(batch.items())
        if torch.is_tensor(v) or isinstance(v, int)
    )


def _checkpoint_without_rng(model: nn.Module) -> None:
    """Checkpointed layers stop saving/restoring RNG state (nothing random runs in them: see the docstring)."""
    state = accel_state(model)
    checkpointing.without_rng(model, offload_without_rng if state is not None and state.offload_layers else None)


class _Graph:
    """One captured shape: the graph, its static inputs and its loss output."""

    def __init__(self, graph, static: dict, loss: torch.Tensor):
        self.graph, self.static, self.loss = graph, static, loss


class GraphedMicroStep:
    """`step(batch, inv_n) -> out`, `out` what `loss_fn` returns: the loss sum (fp32 scalar), or a vector of the
    loss sum and then metric sums (a preference objective's); gradients of loss_sum * inv_n accumulated into .grad.

    `loss_fn(batch) -> out` runs the model (called under autocast here); `backward(loss)` is the
    precision policy's backward (GradScaler scaling for fp16). See the module docstring for the protocol.
    """

    MAX_GRAPHS = 8

    def __init__(
        self, model: nn.Module, params: list, loss_fn, backward, dtype: torch.dtype, warmup: int = 2, note=print
    ):
        self.model, self.params, self.loss_fn, self.backward = model, params, loss_fn, backward
        self.dtype, self.warmup, self.note = dtype, warmup, note
        self.graphs: dict = {}
        self.counts: dict = {}
        self.seen = 0
        self.noted: set = set()
        self.pool = None
        self.stream: torch.cuda.Stream | None = None  # warm-up, eager steps and captures (`eager`)
        self.disabled: str | None = None
        self.inv_n: torch.Tensor | None = None
        self.replays = 0
        self.causal: dict = {}  # (T, device) -> the (T, T) causal mask `prepare` combines with the padding mask
        config = getattr(model, "config", None)
        self.sdpa = getattr(config, "_attn_implementation", "sdpa") in (None, "sdpa")

    def _autocast(self, cache: bool = True):
        return torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=cache)

    def _stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.params[0].device)
        return self.stream

    @contextlib.contextmanager
    def on_stream(self):
        """Run the block on the captures' stream, joined both ways with the caller's: eager work there (the
        warm-up, an evaluation between steps) uses the cuBLAS workspaces the graphs use, instead of making a set
        on the default stream that stays allocated for the rest of the run. Tensors that leave the block must be
        marked for the caller's stream (`record_stream`) or be plain numbers."""
        main, side = torch.cuda.current_stream(), self._stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    def _zero_grads_where_missing(self) -> None:
        """Every parameter gets a .grad (zeros), made on the caller's stream, where the optimizer reads it: the
        steps accumulate into these tensors, and a capture records their addresses."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def eager(self, batch: dict, inv_n: float, fixed: bool = True) -> torch.Tensor:
        """One micro-batch without a graph; `fixed`: the loss's fixed-shape pass, as a capture records it. On the
        captures' stream (`on_stream`), so the warm-up makes the cuBLAS workspaces the captured GEMMs reuse."""
        from lorafuse.kernels.cross_entropy import fixed_shape

        self._zero_grads_where_missing()
        with self.on_stream():
            with self._autocast(), fixed_shape(fixed):
                out = self.loss_fn(batch)
            self.backward(_loss_of(out) * inv_n)
            out = out.detach()
        out.record_stream(torch.cuda.current_stream())  # read on the caller's stream: not reused under it
        return out

    def prepare(self, batch: dict) -> dict:
        """A padded batch's (B, T) attention mask as the (B, 1, T, T) bool mask SDPA takes as given: the 2-D mask
        sends transformers through data-dependent checks (host syncs) that a capture cannot record."""
        mask = batch.get("attention_mask")
        if not self.sdpa or mask is None or mask.dim() != 2 or "position_ids" in batch:
            return batch
        key = (mask.shape[1], mask.device)
        if key not in self.causal:
            self.causal[key] = torch.ones(key[0], key[0], dtype=torch.bool, device=mask.device).tril_()
        return {**batch, "attention_mask": self.causal[key][None, None] & mask.bool()[:, None, None, :]}

    def __call__(self, batch: dict, inv_n: float) -> torch.Tensor:
        if self.disabled:
            return self.eager(batch, inv_n, fixed=False)
        batch = self.prepare(batch)
        key = _batch_key(batch)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen += 1
            count = self.counts[key] = self.counts.get(key, 0) + 1
            if count <= self.warmup:
                if self.seen >= 50 and not self.graphs:
                    self._note_once(
                        "waiting",
                        "CUDA graphs waiting: micro-batch shapes keep changing; set "
                        "data.packing: true (or fewer distinct lengths) for the graph speed-up",
                    )
                return self.eager(batch, inv_n)  # warms up exactly the path a capture will record
            if len(self.graphs) >= self.MAX_GRAPHS:
                self._note_once("full", f"CUDA graphs: {self.MAX_GRAPHS} shapes captured; other shapes run eagerly")
                return self.eager(batch, inv_n, fixed=False)
            entry = self._capture(batch, key)
            if entry is None:
                return self.eager(batch, inv_n, fixed=False)
        for k, v in batch.items():
            if torch.is_tensor(v):
                entry.static[k].copy_(v, non_blocking=True)
        self.inv_n.fill_(inv_n)
        entry.graph.replay()
        self.replays += 1
        return entry.loss.clone()  # consumed before any other replay: the graphs share one memory pool

    def _note_once(self, what: str, text: str) -> None:
        if what not in self.noted:
            self.noted.add(what)
            self.note(text)

    def _capture(self, batch: dict, key: tuple):
        from lorafuse.kernels.cross_entropy import fixed_shape

        self._zero_grads_where_missing()  # the recorded backward must accumulate into these, never rebind .grad
        _checkpoint_without_rng(self.model)
        static = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.inv_n is None:
            self.inv_n = torch.ones((), dtype=torch.float32, device=self.params[0].device)
        grads = [p.grad for p in self.params]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back before the graph's pool grows
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        rng = torch.cuda.default_generators[self.params[0].device.index or 0]
        rng_before = rng.clone_state()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self._stream(), capture_error_mode="thread_local"):
                with self._autocast(cache=False), fixed_shape():
                    loss = self.loss_fn(static)
                self.backward(_loss_of(loss) * self.inv_n)
                loss = loss.detach()
        except Exception as exc:  # a host sync or an uncapturable op inside the model: eager from now on
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            self.disabled = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            self.note(f"CUDA graphs off: capturing the step failed ({self.disabled}); running eagerly")
            self.graphs = {}
            # a capture that fails leaves the generator it registered in capture mode, and every later random draw
            # on the device (dropout, an initialiser) would raise "Offset increment outside graph capture": the
            # generator takes back a copy of its state from before the capture
            rng.graphsafe_set_state(rng_before)
            torch.cuda.synchronize()
            return None
        if any(p.grad is not g for p, g in zip(self.params, grads)):
            self.disabled = "a gradient tensor was rebound during capture"
            self.note(f"CUDA graphs off: {self.disabled}; running eagerly")
            self.graphs = {}
            return None
        entry = self.graphs[key] = _Graph(graph, static, loss)
        shape = tuple(batch["input_ids"].shape) if torch.is_tensor(batch.get("input_ids")) else key[0][1]
        self.note(
            f"CUDA graphs on: forward + backward of {shape} micro-batches replayed as one graph"
            + (f" ({len(self.graphs)} shapes so far)" if len(self.graphs) > 1 else "")
        )
        return entry


def build(model: nn.Module, state, precision, world_size: int, mode: str, objective=None, note=print):
    """The training step's GraphedMicroStep for train.cuda_graphs `mode` (None: eager, with the reason noted).

    `state` is the model's AccelState (its trainable params, head and fused loss), `precision` the loop's
    Precision, `objective` the loop's Objective (None: SFT). The graphed step takes `objective_inputs` of a
    micro-batch. SFT's returns the loss sum; a preference objective's (DPO: the reference pass with the adapter
    off and the policy pass, both recorded; ORPO) returns the vector of its loss sum and metric sums.
    """
    device = precision.device
    if mode == "off" or device.type != "cuda":
        return None
    blocker = graph_blocker(model, device, world_size)
    if blocker:
        note(f"CUDA graphs off: {blocker}")
        return None
    head, fused = state.head, state.fused_loss
    if objective is None or objective.name == "sft":
        loss_fn = lambda b: lm_loss_sum(model, b, head, fused)  # noqa: E731
    else:
        loss_fn = objective_loss_fn(model, objective, precision, head, fused)
    return GraphedMicroStep(model, state.params, loss_fn, precision.backward, precision.dtype, note=note)


class _Captured:
    """The precision policy as an objective sees it inside the graphed step: the step's device and dtype, and no
    autocast of its own (GraphedMicroStep runs the loss under its own, with the cast cache off as capture needs)."""

    def __init__(self, precision):
        self.device, self.dtype = precision.device, precision.dtype

    def autocast(self):
        return contextlib.nullcontext()


def objective_loss_fn(model: nn.Module, objective, precision, head=None, fused: bool = False):
    """inputs -> (loss sum, *metric sums) as one fp32 vector: a preference objective's `loss_on_inputs` in the form
    GraphedMicroStep captures (one output tensor, the loss first; no autocast of the objective's own)."""
    names, ctx = objective.metric_names, ObjectiveContext(_Captured(precision), head, fused)

    def loss_fn(inputs: dict) -> torch.Tensor:
        loss, metrics = objective.loss_on_inputs(model, inputs, ctx)
        return torch.stack([loss.float(), *(metrics[n].float() for n in names)])

    return loss_fn


def dropout_seed_base(seed: int, rank: int, grad_accum: int, step: int) -> int:
    """The fast path's dropout seed base at an optimizer step (each micro-batch's forward then adds 1): from the
    seed and the rank, so ranks draw different masks and a resumed run draws an uninterrupted run's."""
    from lorafuse.kernels.reference import mix32

    stride = 256 if grad_accum < 256 else 1 << grad_accum.bit_length()
    return (mix32((seed * 1_000_003 + rank) & 0xFFFFFFFF) + step * stride) % 2**32


def seed_dropout(model: nn.Module, seed: int, rank: int, grad_accum: int, step: int) -> None:
    """Set the fast path's dropout masks for optimizer step `step` (before the step, and before an OOM retry)."""
    state = accel_state(model)
    if state is not None and state.fast is not None:
        state.fast.set_dropout_seed(dropout_seed_base(seed, rank, grad_accum, step))

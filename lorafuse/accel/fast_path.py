"""Swap the fused ops into a transformers Llama-family model instance (Llama, Mistral, Qwen2, Qwen3).

What changes, per decoder layer, on the INSTANCE only (no class attribute, no library source):
    input_layernorm, post_attention_layernorm (and model.norm, Qwen3's q_norm/k_norm)
        -> FastRMSNorm holding the SAME weight Parameter                 (kernels/rmsnorm.py)
    mlp -> FastLoRAMLP holding the SAME gate_proj/up_proj/down_proj modules (kernels/swiglu_mlp.py: one
        autograd Function for the three LoRA projections and SwiGLU, recomputed in backward)
    self_attn -> FastAttention holding the SAME q/k/v/o projections: q, k, v and o through the fused LoRA
        linear (kernels/lora_linear.py), the rotary embedding through the Q+K kernel (kernels/rope.py); the
        attention itself stays transformers' (sdpa / flash / eager, whatever the model was loaded with), called
        with the original attention module
Parameters, module names and state_dict keys are untouched, so the optimizer, gradient checkpointing
(HF's GradientCheckpointingLayer wraps the decoder layer, which is not replaced) and save_adapter work
as before; `remove_fast_path` puts the original modules back. Every fused op receives the run's
KernelOptions (lorafuse.options) with its operands.

The loss is not swapped here: the training loss calls `kernels.cross_entropy.fused_linear_cross_entropy` on CUDA.

`apply_fast_path(model, opts)` returns (FastPath or None, reason); `use_reference=True` swaps in the same structure
running the PyTorch references, so the swap itself is tested on a CPU. Dropout masks come from a seed on the
device, per LoRA module: (base, module index), with `base` a 0-dim tensor advanced once per training forward by a
pre-hook on the decoder stack. A checkpoint recompute sees the same base, so it regenerates the same masks; a CUDA
graph replays the increment, so every replay draws new ones (training/graphs.py); the training loop sets the base from
the seed, rank and step (`FastPath.set_dropout_seed`), so a resumed run draws the masks an uninterrupted one would.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafuse.kernels import _runtime
from lorafuse.kernels.lora_linear import lora_linear, lora_linears, with_seed
from lorafuse.kernels.reference import (
    DropoutSeed,
    LoRAWeights,
    lora_linear_reference,
    rms_norm_reference,
    rope_reference,
    swiglu_mlp_reference,
)
from lorafuse.kernels.rmsnorm import rms_norm
from lorafuse.kernels.rope import apply_rope
from lorafuse.kernels.swiglu_mlp import swiglu_mlp
from lorafuse.lora.linear import LoRALinear
from lorafuse.model_state import model_state
from lorafuse.options import KernelOptions
from lorafuse.plan import policy


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: object
    linear: object
    swiglu_mlp: object
    rope: object
    linears: object  # (x, specs) -> one output per spec: projections of one input
    opts: KernelOptions = KernelOptions()


KERNEL_OPS = Ops("triton", rms_norm, lora_linear, swiglu_mlp, apply_rope, lora_linears)
REFERENCE_OPS = Ops(
    "reference",
    rms_norm_reference,
    lambda x, lw: lora_linear_reference(x, with_seed(lw)),
    lambda x, *lws: swiglu_mlp_reference(x, *(with_seed(lw) for lw in lws)),
    rope_reference,
    lambda x, lws: tuple(lora_linear_reference(x, with_seed(lw)) for lw in lws),
)


def linear_spec(mod: nn.Module, training: bool, opts: KernelOptions, seed: DropoutSeed | None) -> LoRAWeights:
    """The operands of a LoRALinear, NF4Linear or nn.Linear as the fused ops take them (a LoRALinear whose adapter
    is switched off, `lorafuse.lora.disable`, as its base layer alone)."""
    if isinstance(mod, LoRALinear) and not mod.disabled:
        p = mod.dropout.p if training and isinstance(mod.dropout, nn.Dropout) else 0.0
        return LoRAWeights(
            mod.weight, mod.bias, mod.lora_A.weight, mod.lora_B.weight, mod.scaling, p, seed if p > 0 else None, opts
        )
    return LoRAWeights(mod.weight, mod.bias, opts=opts)


@dataclass
class FastPath:
    """The fused ops in place on one model: what `remove_fast_path` undoes, and the dropout seed base."""

    ops: Ops
    layers: int
    dropout_base: torch.Tensor  # 0-dim int64 on the device
    seeds: dict = field(default_factory=dict)  # LoRALinear -> its DropoutSeed
    causal_only: list = field(default_factory=lambda: [False])  # shared with every FastAttention
    hooks: list = field(default_factory=list)

    def set_dropout_seed(self, value: int) -> None:
        """The base of every module's dropout seed (the loop: from the seed, the rank and the step, so a resumed run
        draws the masks an uninterrupted one would)."""
        self.dropout_base.fill_(int(value))

    def seeds_for(self, *mods: nn.Module) -> tuple:
        return tuple(self.seeds.get(m) for m in mods)


def _advance_dropout_seed(fast: FastPath):
    def hook(backbone: nn.Module, args, kwargs) -> None:
        """A new dropout seed base for each training forward of the decoder stack, on the device (a CUDA graph
        replays the increment). A checkpoint recompute does not run the stack's forward again, so it sees the same
        base and regenerates the same masks."""
        if backbone.training and torch.is_grad_enabled():
            fast.dropout_base.add_(1)

    return hook


def _note_causal_only(fast: FastPath):
    def hook(backbone: nn.Module, args, kwargs) -> None:
        """Was this forward of the stack called without an attention mask or position ids, i.e. plain causal
        attention? Then FastAttention hands SDPA `is_causal` instead of the (T, T) mask that transformers
        materializes while a CUDA graph is being captured (its "is tracing" check): measured on an H200 at 1 x 4096
        tokens, cuDNN's attention with that mask took 3.3x the time of its causal kernel."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        positions = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        fast.causal_only[0] = mask is None and positions is None

    return hook


def _projection_blocker(name: str, mod: nn.Module, dtype: torch.dtype) -> str:
    lora = isinstance(mod, LoRALinear)
    if lora and mod.use_dora:
        return f"{name} uses DoRA, which the fused kernels do not implement yet"
    if lora and mod.merged:
        return f"{name} has its LoRA merged into the base weight"
    w = mod.weight
    if isinstance(w, torch.Tensor):
        if not isinstance(mod, nn.Linear) and not lora:
            return f"{name} is a {type(mod).__name__}, not a linear layer the fast path knows"
        if w.requires_grad:
            return f"{name}'s base weight is trainable (the fused kernels assume a frozen base)"
        if w.dtype != dtype:
            return f"{name}'s weight is {w.dtype} but the hidden states are {dtype}"
    elif getattr(mod, "compute_dtype", None) != dtype:
        return f"{name} computes in {getattr(mod, 'compute_dtype', None)} but the hidden states are {dtype}"
    return ""


def hidden_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the hidden states the decoder layers get: the input embedding's, or the one `accel.prepare`
    casts a trained (fp32) embedding's output to."""
    accel = model_state(model).accel
    cast = None if accel is None else accel.embedding_dtype
    return cast or model.model.embed_tokens.weight.dtype


def fast_path_blocker(model: nn.Module, use_reference: bool = False) -> str:
    """Why the fast path cannot apply to `model` ("" when it can)."""
    import transformers

    why = policy.arch_blocker(type(model).__name__)
    if why:
        return why
    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} is older than 5.0 (the fast path mirrors 5.x attention)"
    if getattr(model.config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {model.config.hidden_act!r} is not SiLU (the fused MLP is SwiGLU)"
    probe = next(model.parameters())
    if not use_reference:
        if not _runtime.HAS_TRITON:
            return "Triton is not installed"
        if not _runtime.use_triton(probe):
            return f"the model is on {probe.device.type}, the fused kernels need a CUDA GPU"
    dtype = hidden_dtype(model)
    for i, layer in enumerate(model.model.layers):
        for part, names in (
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ):
            for n in names:
                mod = getattr(getattr(layer, part, None), n, None)
                if mod is None:
                    return f"layer {i} has no {part}.{n}"
                reason = _projection_blocker(f"layer {i} {part}.{n}", mod, dtype)
                if reason:
                    return reason
    return ""


class FastRMSNorm(nn.Module):
    """RMSNorm sharing the original module's weight Parameter (same state_dict key)."""

    def __init__(self, norm: nn.Module, ops: Ops):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.__dict__["ops"], self.__dict__["original"] = ops, norm  # plain attributes: not submodules

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, ops={self.ops.name}"


class FastLoRAMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) as one fused Function; the three projections are the original modules."""

    def __init__(self, mlp: nn.Module, ops: Ops, fast: FastPath):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.__dict__["ops"], self.__dict__["original"] = ops, mlp
        self.__dict__["seeds"] = fast.seeds_for(self.gate_proj, self.up_proj, self.down_proj)

    def forward(self, x):
        mods = (self.gate_proj, self.up_proj, self.down_proj)
        return self.ops.swiglu_mlp(
            x, *(linear_spec(m, self.training, self.ops.opts, seed) for m, seed in zip(mods, self.seeds))
        )


class FastAttention(nn.Module):
    """transformers 5.x Llama-family attention with the fused projections and RoPE. Its children are the original
    module's (q/k/v/o projections; Qwen3's q_norm/k_norm as FastRMSNorm), in their order, so names, keys and the
    Parameters' order stay; the attention function itself gets the original module, as transformers calls it."""

    def __init__(self, attn: nn.Module, ops: Ops, fast: FastPath, arch: str):
        super().__init__()
        for name, child in attn.named_children():
            setattr(self, name, FastRMSNorm(child, ops) if name in ("q_norm", "k_norm") else child)
        self.__dict__["ops"], self.__dict__["original"], self.__dict__["causal_only"] = ops, attn, fast.causal_only
        self.__dict__["seeds"] = fast.seeds_for(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        # as each model's own forward: Qwen2/3 pass their per-layer window, Mistral the config's, Llama none
        self.passes_sliding_window = arch != "LlamaForCausalLM"
        has_own = hasattr(attn, "sliding_window")
        self.sliding_window = attn.sliding_window if has_own else getattr(attn.config, "sliding_window", None)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn, ops, training = self.original, self.ops, self.training
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        specs = tuple(linear_spec(m, training, ops.opts, seed) for m, seed in zip(projs, self.seeds))
        q, k, v = (y.view(hidden_shape) for y in ops.linears(hidden_states, specs))
        if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = ops.rope(q, k, cos, sin)  # on (B, T, H, D), before the transpose: no copy
        eager = sys.modules[type(attn).__module__].eager_attention_forward
        impl = attn.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        extra = {"sliding_window": self.sliding_window} if self.passes_sliding_window else {}
        dropout = attn.attention_dropout if training else 0.0
        layout = kwargs.pop("pair_layout", None)  # shared-prompt pair rows (lorafuse/data/pair_layout.py)
        call = functools.partial(attention, attn, dropout=dropout, scaling=attn.scaling, **extra, **kwargs)
        if layout is not None and past_key_values is None and self._causal_kernel(impl, q.shape[1]):
            out, weights = _pair_attention(call, q, k, v, layout), None
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, attn.layer_idx, kwargs=kwargs)
            plain = self.causal_only[0] and self._causal_kernel(impl, q.shape[-2], k.shape[-2])
            if attention_mask is not None and plain:
                attention_mask = None  # SDPA's is_causal (the module's is_causal) is the same mask, without reading one
            out, weights = call(q, k, v, attention_mask)
        out = out.reshape(*input_shape, -1).contiguous()
        return ops.linear(out, linear_spec(self.o_proj, training, ops.opts, self.seeds[3])), weights

    def _causal_kernel(self, impl: str | None, q_len: int, kv_len: int | None = None) -> bool:
        """Whether SDPA's is_causal gives the plain causal attention here: SDPA, as many queries as keys (no cache
        offset), more than one, a causal module, and no sliding window that cuts in."""
        window, kv_len = self.sliding_window, q_len if kv_len is None else kv_len
        return (
            (impl or "sdpa") == "sdpa"
            and q_len == kv_len
            and q_len > 1
            and getattr(self.original, "is_causal", True)
            and (window is None or kv_len <= window)
        )


def _pair_attention(call, q, k, v, layout) -> torch.Tensor:
    """Shared-prompt pair rows' attention (B, T, H, D) from q, k, v (B, T, H, D) as two causal attentions
    (`lorafuse.data.pair_layout.pair_attention_plan`): the first `split` columns (prefix, chosen answer), and each
    row's prefix + rejected answer gathered into rows of their own; `assemble` picks each token's output. SDPA's
    causal kernel both times, instead of its masked kernel over the whole row (3.3x slower, `_note_causal_only`).
    The gathers' backward reads the plan's inverse maps (`_GatherRows`): index_select's own is a scatter-add with
    bf16 atomics, measured 1.8% of the 7B DPO step slower (benchmarks/NOTES.md)."""
    split, gather, assemble, gather_inverse, assemble_inverse = layout
    rows, width = q.shape[:2]
    firsts = (x[:, :split].transpose(1, 2) for x in (q, k, v))
    seconds = (_GatherRows.apply(x.flatten(0, 1), gather, gather_inverse).unflatten(0, (rows, -1)) for x in (q, k, v))
    out1, _ = call(*firsts, None)  # (B, split, H, D)
    out2, _ = call(*(x.transpose(1, 2) for x in seconds), None)  # (B, L2, H, D)
    both = torch.cat([out1, out2], 1).flatten(0, 1)
    return _GatherRows.apply(both, assemble, assemble_inverse).unflatten(0, (rows, width))


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, index) whose backward gathers: dx = [dy; 0].index_select(0, inverse), inverse[p] the one
    entry of `index` whose gradient row p receives (len(index): none). It equals index_select's backward, a
    scatter-add with atomics, where every other entry that reads p has a zero gradient, as the pair plan's padding
    has (`pair_attention_plan`); a gather of whole rows costs a fraction of the scatter's bf16 atomics."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return padded.index_select(0, inverse), None, None


_DEFAULT_OPTS = KernelOptions()


def apply_fast_path(
    model: nn.Module, opts: KernelOptions = _DEFAULT_OPTS, use_reference: bool = False
) -> tuple[FastPath | None, str]:
    """Swap the fused ops into `model` in place. Returns (the FastPath to undo it with, or None; a one-line reason)."""
    if any(isinstance(layer.mlp, FastLoRAMLP) for layer in getattr(getattr(model, "model", None), "layers", ())):
        return None, "the fast path is already applied"
    reason = fast_path_blocker(model, use_reference)
    if reason:
        return None, reason
    ops = REFERENCE_OPS if use_reference else KERNEL_OPS
    ops = Ops(ops.name, ops.rms_norm, ops.linear, ops.swiglu_mlp, ops.rope, ops.linears, opts)
    backbone, arch = model.model, type(model).__name__
    base = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device)
    lora = [m for m in backbone.modules() if isinstance(m, LoRALinear)]
    fast = FastPath(ops, len(backbone.layers), base, {m: DropoutSeed(base, k) for k, m in enumerate(lora)})
    for layer in backbone.layers:
        layer.input_layernorm = FastRMSNorm(layer.input_layernorm, ops)
        layer.post_attention_layernorm = FastRMSNorm(layer.post_attention_layernorm, ops)
        layer.mlp = FastLoRAMLP(layer.mlp, ops, fast)
        layer.self_attn = FastAttention(layer.self_attn, ops, fast, arch)
    backbone.norm = FastRMSNorm(backbone.norm, ops)
    fast.hooks = [
        backbone.register_forward_pre_hook(_advance_dropout_seed(fast), with_kwargs=True),
        backbone.register_forward_pre_hook(_note_causal_only(fast), with_kwargs=True),
    ]
    return fast, f"fast path on ({ops.name} ops, {fast.layers} layers)"


def remove_fast_path(model: nn.Module, fast: FastPath) -> None:
    """Put the original modules back (the inverse of apply_fast_path)."""
    backbone = model.model
    for layer in backbone.layers:
        layer.input_layernorm = layer.input_layernorm.original
        layer.post_attention_layernorm = layer.post_attention_layernorm.original
        layer.mlp = layer.mlp.original
        layer.self_attn = layer.self_attn.original
    backbone.norm = backbone.norm.original
    for hook in fast.hooks:
        hook.remove()

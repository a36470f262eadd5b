"""Swap the fused ops into a transformers Llama-family model instance (Llama, Mistral, Qwen2, Qwen3).

What changes, per decoder layer, on the INSTANCE only (no class attribute, no library source):
    input_layernorm, post_attention_layernorm (and model.norm, Qwen3's q_norm/k_norm)
        -> FastRMSNorm holding the SAME weight Parameter                 (rmsnorm.py)
    mlp -> FastLoRAMLP holding the SAME gate_proj/up_proj/down_proj modules (swiglu_mlp.py: one
        autograd Function for the three LoRA projections and SwiGLU, recomputed in backward)
    self_attn.forward -> a bound method: q, k, v and o through the fused LoRA linear (lora_linear.py; q|k|v as
        one grouped GEMM with LORAFUSE_QKV_GROUP=1, lora_group.py, off by default: no gain measured), the
        rotary embedding through the Q+K kernel (rope.py); the attention itself
        stays transformers' (sdpa / flash / eager, whatever the model was loaded with)
Parameters, module names and state_dict keys are untouched, so the optimizer, gradient checkpointing
(HF's GradientCheckpointingLayer wraps the decoder layer, which is not replaced) and save_adapter work
as before; `remove_fast_path` puts the original modules back.

The loss is not swapped here: the training loop's chunked loss calls
`cross_entropy.fused_linear_cross_entropy` on CUDA (see the kernels package docstring).

`apply_fast_path(model)` returns (applied, reason); `use_reference=True` swaps in the same structure
running the PyTorch references, so the swap itself is tested on a CPU. Dropout masks come from a seed
on the device, per LoRA module: (base, module index), with `base` a 0-dim tensor advanced once per training
forward by a pre-hook on the decoder stack. A checkpoint recompute sees the same base, so it regenerates the
same masks; a CUDA graph replays the increment, so every replay draws new ones (train/graphs.py); the training
loop sets the base from the seed, rank and step (`set_dropout_seed`), so a resumed run draws the masks
an uninterrupted one would.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from . import _runtime
from .cross_entropy import fused_linear_cross_entropy  # noqa: F401  (re-exported for the training loop)
from .lora_group import lora_linear_group
from .lora_linear import lora_linear, with_seed
from .reference import (
    DropoutSeed,
    LoRAWeights,
    lora_linear_reference,
    rms_norm_reference,
    rope_reference,
    swiglu_mlp_reference,
)
from .rmsnorm import rms_norm
from .rope import apply_rope
from .swiglu_mlp import swiglu_mlp

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: object
    linear: object
    swiglu_mlp: object
    rope: object
    linear_group: object  # (x, specs) -> one output per spec; the reference: one linear each


KERNEL_OPS = Ops("triton", rms_norm, lora_linear, swiglu_mlp, apply_rope, lora_linear_group)
REFERENCE_OPS = Ops(
    "reference",
    rms_norm_reference,
    lambda x, lw: lora_linear_reference(x, with_seed(lw)),
    lambda x, *lws: swiglu_mlp_reference(x, *(with_seed(lw) for lw in lws)),
    rope_reference,
    lambda x, lws: tuple(lora_linear_reference(x, with_seed(lw)) for lw in lws),
)


def _is_lora(mod: nn.Module) -> bool:
    return all(hasattr(mod, a) for a in ("lora_A", "lora_B", "scaling", "dropout", "use_dora"))


def linear_spec(mod: nn.Module, training: bool) -> LoRAWeights:
    """The operands of a LoRALinear, NF4Linear or nn.Linear as the fused ops take them."""
    if _is_lora(mod):
        p = mod.dropout.p if training and isinstance(mod.dropout, nn.Dropout) else 0.0
        seed = getattr(mod, "lorafuse_dropout_seed", None) if p > 0 else None
        return LoRAWeights(mod.weight, mod.bias, mod.lora_A.weight, mod.lora_B.weight, mod.scaling, p, seed)
    return LoRAWeights(mod.weight, mod.bias)


def _advance_dropout_seed(backbone: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the decoder stack: a new dropout seed base for each training forward, on the device
    (a CUDA graph replays the increment). A checkpoint recompute does not run the stack's forward again, so it
    sees the same base and regenerates the same masks."""
    if backbone.training and torch.is_grad_enabled():
        backbone.lorafuse_dropout_base.add_(1)


def set_dropout_seed(model: nn.Module, value: int) -> None:
    """Set the dropout seed base (the training loop: from the seed, the rank and the step, so a resumed run draws
    the masks an uninterrupted one would). No-op without the fast path."""
    base = getattr(getattr(model, "model", None), "lorafuse_dropout_base", None)
    if base is not None:
        base.fill_(int(value))


def _note_causal_only(backbone: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the decoder stack: was this forward called without an attention mask or position ids,
    i.e. plain causal attention? Then the fused attention hands SDPA `is_causal` instead of the (T, T) mask that
    transformers materializes while a CUDA graph is being captured (its "is tracing" check): measured on an H200
    at 1 x 4096 tokens, cuDNN's attention with that mask took 3.3x the time of its causal kernel."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    positions = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
    backbone.lorafuse_causal_only[0] = mask is None and positions is None


def _install_stack_hooks(model: nn.Module) -> None:
    backbone = model.model
    device = next(model.parameters()).device
    base = torch.zeros((), dtype=torch.int64, device=device)
    backbone.lorafuse_dropout_base = base
    for k, mod in enumerate(m for m in backbone.modules() if _is_lora(m)):
        mod.lorafuse_dropout_seed = DropoutSeed(base, k)
    backbone.lorafuse_dropout_hook = backbone.register_forward_pre_hook(_advance_dropout_seed, with_kwargs=True)
    backbone.lorafuse_causal_only = [False]  # shared with every attention module (`_attention_forward`)
    backbone.lorafuse_causal_hook = backbone.register_forward_pre_hook(_note_causal_only, with_kwargs=True)
    for layer in backbone.layers:
        layer.self_attn.lorafuse_causal_only = backbone.lorafuse_causal_only


def _remove_stack_hooks(model: nn.Module) -> None:
    backbone = model.model
    backbone.lorafuse_dropout_hook.remove()
    backbone.lorafuse_causal_hook.remove()
    for layer in backbone.layers:
        del layer.self_attn.lorafuse_causal_only
    del backbone.lorafuse_causal_hook, backbone.lorafuse_causal_only
    for mod in backbone.modules():
        if hasattr(mod, "lorafuse_dropout_seed"):
            del mod.lorafuse_dropout_seed
    del backbone.lorafuse_dropout_hook, backbone.lorafuse_dropout_base


def _projection_blocker(name: str, mod: nn.Module, dtype: torch.dtype) -> str:
    if _is_lora(mod) and mod.use_dora:
        return f"{name} uses DoRA, which the fused kernels do not implement yet"
    if _is_lora(mod) and getattr(mod, "merged", False):
        return f"{name} has its LoRA merged into the base weight"
    w = mod.weight
    if isinstance(w, torch.Tensor):
        if not isinstance(mod, nn.Linear) and not _is_lora(mod):
            return f"{name} is a {type(mod).__name__}, not a linear layer the fast path knows"
        if w.requires_grad:
            return f"{name}'s base weight is trainable (the fused kernels assume a frozen base)"
        if w.dtype != dtype:
            return f"{name}'s weight is {w.dtype} but the hidden states are {dtype}"
    elif getattr(mod, "compute_dtype", None) != dtype:
        return f"{name} computes in {getattr(mod, 'compute_dtype', None)} but the hidden states are {dtype}"
    return ""


def fast_path_blocker(model: nn.Module, use_reference: bool = False) -> str:
    """Why the fast path cannot apply to `model` ("" when it can)."""
    import transformers

    arch = type(model).__name__
    if arch not in SUPPORTED:
        return f"{arch} is not a supported architecture (fast path: {', '.join(SUPPORTED)})"
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
    dtype = model.model.embed_tokens.weight.dtype
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer, "lorafuse_fast"):
            continue
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

    def __init__(self, mlp: nn.Module, ops: Ops):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.__dict__["ops"], self.__dict__["original"] = ops, mlp

    def forward(self, x):
        specs = (linear_spec(m, self.training) for m in (self.gate_proj, self.up_proj, self.down_proj))
        return self.ops.swiglu_mlp(x, *specs)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers 5.x Llama-family attention with the fused projections and RoPE (bound per instance)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ops, training = self.lorafuse_ops, self.training
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    specs = tuple(linear_spec(proj, training) for proj in (self.q_proj, self.k_proj, self.v_proj))
    # column views of one (B, T, Nq + Nk + Nv) tensor: viewable as heads; RoPE and SDPA take the strides
    q, k, v = (y.view(hidden_shape) for y in ops.linear_group(hidden_states, specs))
    # SDPA saves v for its backward: as a view it would keep the whole q|k|v output alive (RoPE makes new q and
    # k), 2 x (Nq + Nk) bytes a token more per layer that saves its activations (measured: 25 MB a layer at 7B,
    # 4 x 512, with train.uncheckpointed_layers), and in the recompute on the backward's peak. A copy of v is less.
    v = v.contiguous()
    if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = ops.rope(q, k, cos, sin)  # on (B, T, H, D), before the transpose: no copy
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    impl = self.config._attn_implementation
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    if attention_mask is not None and _plain_causal(self, impl, q.shape[-2], k.shape[-2]):
        attention_mask = None  # SDPA's is_causal (the module's is_causal) is the same mask, without reading one
    extra = {"sliding_window": self.lorafuse_sliding_window} if self.lorafuse_passes_sliding_window else {}
    out, weights = attention(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=self.attention_dropout if training else 0.0,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return ops.linear(out, linear_spec(self.o_proj, training)), weights


def _plain_causal(attn: nn.Module, impl: str | None, q_len: int, kv_len: int) -> bool:
    """The stack was called without a mask (`_note_causal_only`), so the mask transformers built is the plain
    causal one: true for SDPA with as many queries as keys (no cache offset) and no sliding window that cuts in."""
    window = attn.lorafuse_sliding_window
    return (
        attn.lorafuse_causal_only[0]
        and (impl or "sdpa") == "sdpa"
        and q_len == kv_len
        and q_len > 1
        and getattr(attn, "is_causal", True)
        and (window is None or kv_len <= window)
    )


def _patch_attention(attn: nn.Module, ops: Ops, arch: str) -> None:
    if hasattr(attn, "q_norm"):
        attn.q_norm, attn.k_norm = FastRMSNorm(attn.q_norm, ops), FastRMSNorm(attn.k_norm, ops)
    attn.lorafuse_ops = ops
    # as each model's own forward: Qwen2/3 pass their per-layer window, Mistral the config's, Llama none
    attn.lorafuse_passes_sliding_window = arch != "LlamaForCausalLM"
    attn.lorafuse_sliding_window = (
        attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    )
    attn.forward = types.MethodType(_attention_forward, attn)


def apply_fast_path(model: nn.Module, use_reference: bool = False) -> tuple[bool, str]:
    """Swap the fused ops into `model` in place. Returns (applied, one-line reason)."""
    if getattr(model, "lorafuse_fast_path", None):
        return True, "fast path already applied"
    reason = fast_path_blocker(model, use_reference)
    if reason:
        return False, reason
    ops = REFERENCE_OPS if use_reference else KERNEL_OPS
    arch = type(model).__name__
    for layer in model.model.layers:
        layer.input_layernorm = FastRMSNorm(layer.input_layernorm, ops)
        layer.post_attention_layernorm = FastRMSNorm(layer.post_attention_layernorm, ops)
        layer.mlp = FastLoRAMLP(layer.mlp, ops)
        _patch_attention(layer.self_attn, ops, arch)
        layer.lorafuse_fast = True
    model.model.norm = FastRMSNorm(model.model.norm, ops)
    _install_stack_hooks(model)
    model.lorafuse_fast_path = {"ops": ops.name, "layers": len(model.model.layers)}
    return True, f"fast path on ({ops.name} ops, {len(model.model.layers)} layers)"


def remove_fast_path(model: nn.Module) -> None:
    """Put the original modules and forwards back (inverse of apply_fast_path)."""
    if not getattr(model, "lorafuse_fast_path", None):
        return
    for layer in model.model.layers:
        layer.input_layernorm = layer.input_layernorm.original
        layer.post_attention_layernorm = layer.post_attention_layernorm.original
        layer.mlp = layer.mlp.original
        attn = layer.self_attn
        if isinstance(getattr(attn, "q_norm", None), FastRMSNorm):
            attn.q_norm, attn.k_norm = attn.q_norm.original, attn.k_norm.original
        del attn.forward
        for name in ("lorafuse_ops", "lorafuse_passes_sliding_window", "lorafuse_sliding_window"):
            delattr(attn, name)
        del layer.lorafuse_fast
    model.model.norm = model.model.norm.original
    _remove_stack_hooks(model)
    model.lorafuse_fast_path = None


def maybe_apply_fast_path(model: nn.Module, mode: str = "auto", log=print) -> bool:
    """The training loop's entry: "off" -> False; "auto" -> apply, or log the one-line reason it did not;
    "on" -> apply or raise LorafuseError with the reason and the fix."""
    if mode == "off":
        return False
    applied, reason = apply_fast_path(model)
    if applied:
        return True
    if mode == "on":
        from lorafuse.errors import LorafuseError

        raise LorafuseError(
            f"train.fast_path is 'on' but the fast path cannot apply: {reason}",
            "set train.fast_path=auto (falls back to the PyTorch path) or fix the cause above",
        )
    log(f"fast path off: {reason}")
    return False

"""Model architecture facts for GGUF: the HF config as llama.cpp hyperparameters, HF tensor names as GGUF names
(gguf's own TensorNameMap), and the q/k row order llama.cpp's Llama rope expects.

Supported HF model types -> GGUF architecture:
    llama, mistral -> "llama"   rope type NORM: rotates adjacent pairs (2i, 2i+1) of each head
    qwen2          -> "qwen2"   rope type NEOX: rotates (i, i + d/2), as HF does; q/k/v biases
    qwen3          -> "qwen3"   NEOX; a per-head RMSNorm on q and k (attn_q_norm / attn_k_norm)

Rope layout. HF applies rotate_half: within each head of size d, element i pairs with i + d/2. llama.cpp's NORM rope
pairs 2i with 2i+1. So for "llama" the rows of W_q (per query head) and W_k (per kv head), and everything indexed by
those rows (their biases, the LoRA B matrices), are reordered within each head:

    W (n_heads * d, ...) -> W.view(n_heads, 2, d/2, ...).transpose(1, 2).reshape(n_heads * d, ...)

so new row 2j is old row j and new row 2j+1 is old row j + d/2. q·k is unchanged because q and k move alike.

Hyperparameters come from the config; the vocabulary size from the embedding tensor (trained or resized rows count).
Rope: theta (transformers 5 `rope_parameters`, or the older `rope_theta` / `rope_scaling`); "linear" scaling becomes
GGUF's linear scaling; "llama3" becomes the per-frequency divisors llama.cpp reads from the `rope_freqs` tensor,
computed with transformers' own rope functions (default inv_freq / llama3 inv_freq). Other scalings are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from lorafuse.errors import ModelError

# HF model_type -> (gguf MODEL_ARCH member name, q/k rows need the NORM-rope permutation)
_ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False)}
_QK = re.compile(r"^blk\.\d+\.attn_[qk]\.(weight|bias)$")


@dataclass(frozen=True)
class Arch:
    """One model's GGUF architecture: its name, head layout and the HF -> GGUF tensor name map."""

    name: str  # the GGUF architecture string, e.g. "llama"
    permute_qk: bool
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    config: Any
    name_map: Any  # gguf.TensorNameMap

    def gguf_name(self, hf_name: str) -> str:
        """GGUF name of an HF parameter ("model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight")."""
        name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(
                f"the tensor {hf_name} has no GGUF name in the {self.name!r} architecture, so llama.cpp would not "
                "know what it is",
                "export models with the standard layout of their architecture (a custom module added to the model "
                "cannot go into a GGUF file); `lorafuse export --format hf` writes the merged folder instead",
            )
        return name

    def to_gguf_rows(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Reorder the output rows of attn_q / attn_k (weights, biases, LoRA B) for llama.cpp's NORM rope."""
        if not (self.permute_qk and _QK.match(gguf_name)):
            return tensor
        heads = self.n_head if ".attn_q." in gguf_name else self.n_kv_head
        rows = tensor.shape[0]
        if rows != heads * self.head_dim:
            raise ModelError(
                f"{gguf_name} has {rows} rows, not heads x head_dim = {heads} x {self.head_dim}",
                "check num_attention_heads / num_key_value_heads / head_dim in config.json",
            )
        rest = tensor.shape[1:]
        return tensor.reshape(heads, 2, self.head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def arch_of(config) -> Arch:
    """The GGUF architecture of a transformers config; ModelError for one lorafuse cannot export."""
    import gguf

    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise ModelError(
            f"GGUF export supports the Llama family (llama, mistral) and Qwen2/Qwen3; this model is {model_type!r}",
            "export the merged model as a folder (`lorafuse export --format hf`) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more architectures",
        )
    member, permute = _ARCHS[model_type]
    model_arch = getattr(gguf.MODEL_ARCH, member)
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if float(getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ModelError(
            f"{model_type} with partial_rotary_factor={config.partial_rotary_factor} is not supported by the "
            "GGUF export",
            "export with `--format hf` and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    n_layer = config.num_hidden_layers
    return Arch(
        name=gguf.MODEL_ARCH_NAMES[model_arch],
        permute_qk=permute,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim,
        config=config,
        name_map=gguf.get_tensor_name_map(model_arch, n_layer),
    )


def rope_settings(config) -> tuple[float, dict]:
    """(theta, scaling dict with "rope_type") from either config layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return float(params["rope_theta"]), params


def write_hparams(writer, arch: Arch, n_vocab: int) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph."""
    import gguf

    c = arch.config
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_block_count(arch.n_layer)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_kv_head)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    theta, scaling = rope_settings(c)
    writer.add_rope_freq_base(theta)
    kind = scaling["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3" and arch.name == "llama":
        pass  # carried by the rope_freqs tensor (rope_freqs below)
    elif kind != "default":
        raise ModelError(
            f"rope scaling {kind!r} ({arch.config.model_type}) is not supported by the GGUF export",
            "supported: none, linear, llama3 (Llama); export with `--format hf` and convert with llama.cpp's "
            "convert_hf_to_gguf.py",
        )


def rope_freqs(arch: Arch) -> torch.Tensor | None:
    """llama3 rope: (head_dim/2,) fp32 divisors of each rotary frequency (llama.cpp's rope_freqs.weight), else None.

    transformers computes the scaled inverse frequencies; the divisor is default / scaled, which is what llama.cpp
    divides each frequency by.
    """
    _, scaling = rope_settings(arch.config)
    if scaling["rope_type"] != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, _ = rope_settings(arch.config)
    default = 1.0 / (theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](arch.config, torch.device("cpu"))
    return (default / scaled.float()).contiguous()

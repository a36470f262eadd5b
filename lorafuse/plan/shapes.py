"""Model shapes for the memory planner: read from config.json only, never from weights.

A shape is what the planner needs from a Llama-style decoder (Llama 1/2/3, Mistral, Qwen2/2.5/3):

    V vocab, D hidden, F intermediate (MLP), L layers, H query heads, Hkv key/value heads, d_h head dim.

Per layer there are seven linear layers (W is out x in):

    q_proj (H d_h x D)    k_proj (Hkv d_h x D)   v_proj (Hkv d_h x D)   o_proj (D x H d_h)
    gate_proj (F x D)     up_proj (F x D)        down_proj (D x F)

plus two RMSNorm scales (D each; Qwen3 adds q_norm/k_norm of d_h each) and, for Qwen2, biases on q, k and v.
Outside the layers: the embedding (V x D), the final norm (D) and the head (V x D, absent when tied).
Llama-2-7B: 32 x (4 D^2 + 3 D F + 2 D) + 2 V D + D = 6,738,415,616 parameters (HF's count).

`load_shape(name_or_path)` resolves, in order: a local folder's (or file's) config.json; a built-in shape by
short name ("llama2-7b") or hub id ("meta-llama/Llama-2-7b-hf", chat/instruct/bnb-4bit variants included);
`huggingface_hub.hf_hub_download(repo, "config.json")` when the network is allowed; else a `ModelError`
listing the built-in shapes. The built-in configs are the hub's config.json values (the fields we read).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.errors import ModelError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _llama(V, D, F, L, H, Hkv, max_pos, **extra) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
    }


def _qwen25(D, F, L, H, Hkv, V=152064, tied=False) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    }


_L3 = {"rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001}
BUILTIN_CONFIGS: dict[str, dict] = {
    # The tiny shape matches lorafuse.model.tiny.build_tiny_model's defaults (smoke tests, CPU bench).
    "tiny": _llama(512, 64, 128, 2, 4, 2, 1024),
    "llama-7b": _llama(32000, 4096, 11008, 32, 32, 32, 2048, rms_norm_eps=1e-6),
    "llama-13b": _llama(32000, 5120, 13824, 40, 40, 40, 2048, rms_norm_eps=1e-6),
    "llama-65b": _llama(32000, 8192, 22016, 80, 64, 64, 2048),
    "tinyllama-1.1b": _llama(32000, 2048, 5632, 22, 32, 4, 2048),
    "llama3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, 131072, tie_word_embeddings=True, head_dim=64, **_L3),
    "llama3.2-3b": _llama(128256, 3072, 8192, 28, 24, 8, 131072, tie_word_embeddings=True, head_dim=128, **_L3),
    "llama2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, **_L3),
    "llama3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192, **_L3),
    "mistral-7b": {**_llama(32000, 4096, 14336, 32, 32, 8, 32768), "model_type": "mistral"},
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, V=151936, tied=True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, V=151936, tied=True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, V=151936, tied=True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8),
}

# Hub ids (lower case, organisation dropped, variant suffixes removed) -> built-in name.
_HUB_ALIASES = {
    "llama-2-7b": "llama2-7b",
    "llama-2-13b": "llama2-13b",
    "llama-2-70b": "llama2-70b",
    "meta-llama-3-8b": "llama3-8b",
    "llama-3-8b": "llama3-8b",
    "meta-llama-3.1-8b": "llama3-8b",
    "llama-3.1-8b": "llama3-8b",
    "meta-llama-3-70b": "llama3-70b",
    "llama-3-70b": "llama3-70b",
    "meta-llama-3.1-70b": "llama3-70b",
    "llama-3.1-70b": "llama3-70b",
    "llama-3.3-70b": "llama3-70b",
    "llama-7b": "llama-7b",
    "llama-13b": "llama-13b",
    "llama-65b": "llama-65b",
    "llama-3.2-1b": "llama3.2-1b",
    "llama-3.2-3b": "llama3.2-3b",
    "tinyllama-1.1b-chat-v1.0": "tinyllama-1.1b",
    "tinyllama-1.1b-intermediate-step-1431k-3t": "tinyllama-1.1b",
    "mistral-7b-v0.1": "mistral-7b",
    "mistral-7b-v0.3": "mistral-7b",
    "mistral-7b": "mistral-7b",
    **{f"qwen2.5-{s}": f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
}
_VARIANT = re.compile(r"(-(hf|chat|instruct|it|base|bnb-4bit|unsloth-bnb-4bit))+$")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer: W is (out_features, in_features)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: dict, name: str = "custom") -> ModelShape:
        need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in need if cfg.get(k) is None]
        if missing:
            raise ModelError(
                f"config.json of {name} (model_type={cfg.get('model_type')!r}) lacks {missing}: the planner "
                "handles Llama-style decoders (llama, mistral, qwen2, qwen3)",
                f"plan with a built-in shape instead: {', '.join(BUILTIN_CONFIGS)}",
            )
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "llama")
        return cls(
            name=name,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-family configs say so with attention_bias.
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            config=dict(cfg),
        )

    def linears(self) -> list[Linear]:
        """The seven linear layers of one decoder layer."""
        D, F, q, kv = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        b = self.qkv_bias
        return [
            Linear("q_proj", D, q, b),
            Linear("k_proj", D, kv, b),
            Linear("v_proj", D, kv, b),
            Linear("o_proj", q, D, False),
            Linear("gate_proj", D, F, False),
            Linear("up_proj", D, F, False),
            Linear("down_proj", F, D, False),
        ]

    def module_name(self, layer: int, linear: str) -> str:
        """The full module name transformers gives this linear ("model.layers.0.self_attn.q_proj")."""
        block = "self_attn" if linear in _ATTN else "mlp"
        return f"model.layers.{layer}.{block}.{linear}"

    @property
    def linear_params(self) -> int:
        """Weights of all layers' linear layers (what NF4 quantizes), biases excluded."""
        return self.num_layers * sum(lin.numel for lin in self.linears())

    @property
    def bias_params(self) -> int:
        return self.num_layers * sum(lin.out_features for lin in self.linears() if lin.bias)

    @property
    def norm_params(self) -> int:
        per_layer = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.linear_params + self.bias_params + self.norm_params + self.embed_params + self.head_params

    def hf_config(self) -> dict:
        """A config.json dict transformers builds this model from."""
        return dict(self.config)


def builtin_names() -> list[str]:
    return list(BUILTIN_CONFIGS)


def builtin_shape(name: str) -> ModelShape:
    return ModelShape.from_config(BUILTIN_CONFIGS[name], name=name)


def match_builtin(name_or_id: str) -> str | None:
    """The built-in shape a short name or hub id stands for, or None."""
    key = name_or_id.strip().lower()
    if key in BUILTIN_CONFIGS:
        return key
    key = _VARIANT.sub("", key.rsplit("/", 1)[-1])
    if key in BUILTIN_CONFIGS:
        return key
    return _HUB_ALIASES.get(key)


def _read_config(path: Path, name: str) -> ModelShape:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read {path}: {exc}", "point model.path at a model folder with a valid config.json"
        ) from None
    # Multimodal wrappers keep the decoder's shape under text_config.
    return ModelShape.from_config(cfg.get("text_config", cfg), name=name)


def load_shape(name_or_path: str) -> ModelShape:
    """Resolve a model's shape from config.json alone (module docstring gives the order)."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith("builtin:"):
        from lorafuse.model.load import resolve_model_path  # builds the demo model's folder if needed

        return _read_config(Path(resolve_model_path(name_or_path)) / "config.json", name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"{p} has no config.json",
                "point model.path at a Hugging Face model folder (config.json + weights) or use a hub id",
            )
        return _read_config(p / "config.json", p.name)
    if p.is_file():
        return _read_config(p, p.parent.name)
    builtin = match_builtin(name_or_path)
    if builtin:
        return builtin_shape(builtin)
    return _download_shape(name_or_path)


def _download_shape(repo: str) -> ModelShape:
    from lorafuse.hub import hub_source, is_hub_id

    known = ", ".join(BUILTIN_CONFIGS)
    if not is_hub_id(repo):
        raise ModelError(
            f"unknown model {repo!r}: not a local folder, not a built-in shape, and not a hub id (owner/name)",
            f"use a built-in shape ({known}), a hub id, or a local folder with config.json",
        )
    try:
        source = hub_source(repo)  # offline: the cached snapshot, else the error at once (no retries)
    except ModelError as err:
        raise ModelError(err.problem, f"{err.fix}, or plan with a built-in shape ({known})") from None
    if source != repo:
        return _read_config(Path(source) / "config.json", repo)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "config.json")
    except Exception as exc:  # auth, missing repo: all mean "cannot read the shape"
        raise ModelError(
            f"cannot download config.json of {repo!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            f"check the id, log in for a gated model (huggingface-cli login), or use a built-in shape ({known})",
        ) from None
    return _read_config(Path(path), repo)

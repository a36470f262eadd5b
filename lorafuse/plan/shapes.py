"""Model shapes for the memory planner: read from config.json only, never from weights.

A shape is what the planner needs from a Llama-style decoder (Llama 1/2/3, Mistral, Qwen2/2.5/3):

    V vocab, D hidden, F intermediate (MLP), L layers, H query heads, Hkv key/value heads, d_h head dim.

Per layer there are seven linear layers (W is out x in):

    q_proj (H d_h x D)    k_proj (Hkv d_h x D)   v_proj (Hkv d_h x D)   o_proj (D x H d_h)
    gate_proj (F x D)     up_proj (F x D)        down_proj (D x F)

plus two RMSNorm scales (D each; Qwen3 adds q_norm/k_norm of d_h each) and, for Qwen2, biases on q, k and v.
Outside the layers: the embedding (V x D), the final norm (D) and the head (V x D, absent when tied).
Llama-2-7B: 32 x (4 D^2 + 3 D F + 2 D) + 2 V D + D = 6,738,415,616 parameters (HF's count).

`load_shape(name_or_path)` resolves, in order: "builtin:tiny-llama" from its recipe (lorafuse.builtin, never its
built folder); a local folder's (or file's) config.json; a built-in shape (lorafuse.builtin.BUILTIN_CONFIGS) by
short name ("llama2-7b") or hub id ("meta-llama/Llama-2-7b-hf", chat/instruct/bnb-4bit variants included);
`huggingface_hub.hf_hub_download(repo, "config.json")` when the network is allowed; else a `ModelError`
listing the built-in shapes. The built-in configs are the hub's config.json values (the fields we read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafuse import builtin
from lorafuse.builtin import BUILTIN_CONFIGS, match_builtin
from lorafuse.errors import ModelError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


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
    if name_or_path.startswith(builtin.PREFIX):  # lorafuse's own tiny model: its recipe, not its built folder
        name = name_or_path[len(builtin.PREFIX) :]
        if name not in builtin.MODELS:
            raise ModelError(
                f"unknown builtin model {name_or_path!r}",
                f"available: {', '.join(builtin.PREFIX + n for n in builtin.MODELS)}",
            )
        return ModelShape.from_config(builtin.model_config(name), name=name_or_path)
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
    known = match_builtin(name_or_path)
    if known:
        return builtin_shape(known)
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

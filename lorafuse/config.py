"""The run configuration: one validated tree (model, lora, data, train, output) per training job.

A run is described by a YAML file plus command-line overrides (`lora.r=32`), or by the built-in demo
(`demo_config()`, a tiny Llama trained on the bundled sample rows so `lorafuse train` works on a CPU).
Validation is pydantic v2 with `extra="forbid"`: a key that does not exist is an error, never silently
ignored (a misspelt `lora.rank` that quietly trains at the default r=16 is the bug this prevents).

Every pydantic problem is turned into ONE `ConfigError` that lists each bad key as a dotted path, the value
given, what is allowed, and for unknown keys the nearest valid key: first from a table of the names other
tools use (`learning_rate` -> `train.lr`, `target_modules` -> `lora.targets`), then by string similarity.

The sections are lorafuse/config_sections.py and config_train.py (one description per field: docs/config.md is
generated from them).
Paths (model.path when it is a folder, data.path, data.val_path, data.cache_dir, output.dir) have `~` and
$VARIABLES expanded on validation; an unset variable is an error rather than a literal folder name.

Defaults are the usual transformers + peft + bitsandbytes QLoRA recipe: NF4 with double quantization, r=16,
alpha=32 (2r), dropout 0.05 on the seven Llama projections, lr 2e-4, paged 8-bit AdamW, micro-batch 4 x
accumulation 4, 512 tokens.

`config_diff` compares two configs key by key; the trainer uses it to refuse resuming a checkpoint under
a config whose math differs. Keys in `RESUME_MUTABLE_KEYS` (run length, checkpoint/eval/log cadence,
where files go) may change between a run and its resume; extending `max_steps`/`epochs` also stretches the
LR schedule from the resume point on, which is the usual meaning of "train longer".
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from lorafuse.atomic import write_atomic
from lorafuse.builtin import BUILTIN_DATA, BUILTIN_MODEL
from lorafuse.config_errors import check_key_path, validation_error_to_config_error
from lorafuse.config_sections import (
    DataConfig,
    ExperimentalConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    _Section,
)
from lorafuse.config_train import TrainConfig
from lorafuse.config_yaml import parse_override_value, read_yaml_mapping
from lorafuse.errors import ConfigError
from lorafuse.options import KernelOptions, Options

SECTIONS = ("model", "lora", "data", "train", "output", "experimental")

# Keys that may differ between a run and its resume without changing the optimisation math.
RESUME_MUTABLE_KEYS = frozenset(
    {
        "train.epochs",
        "train.max_steps",
        "train.save_every",
        "train.save_total_limit",
        "train.eval_every",
        "train.eval_batch_size",
        "train.log_every",
        "train.early_stopping_patience",
        "train.early_stopping_min_delta",
        "train.nan_tolerance",
        "train.fast_path",
        "train.report_to",
        "output.dir",
        "data.cache_dir",
    }
)


class RunConfig(_Section):
    """A whole training run."""

    model: ModelConfig = Field(description="The base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter.")
    data: DataConfig = Field(description="The training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The optimisation.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Output folder.")
    experimental: ExperimentalConfig = Field(
        default_factory=ExperimentalConfig, description="Switches under measurement."
    )

    def options(self) -> Options:
        """The frozen switches every layer below the config receives (lorafuse/options.py)."""
        return options_for(self.train, self.experimental)

    @model_validator(mode="after")
    def _needs_validation_data(self) -> RunConfig:
        has_val = bool(self.data.val_size or self.data.val_path)
        if self.train.early_stopping_patience and not has_val:
            raise ValueError(
                "train.early_stopping_patience needs validation data: set data.val_size (e.g. 0.05) or "
                "data.val_path, or train.early_stopping_patience=null"
            )
        if self.train.eval_every and not has_val:
            raise ValueError(
                "train.eval_every is set but there is no validation data: set data.val_size "
                "(e.g. 0.05) or data.val_path, or train.eval_every=null"
            )
        return self

    @model_validator(mode="after")
    def _modules_rate(self) -> RunConfig:
        if self.train.modules_to_save_lr is not None and not self.lora.modules_to_save:
            raise ValueError(
                "train.modules_to_save_lr sets the rate of lora.modules_to_save, which lists no module: add the "
                "modules to train whole (e.g. lora.modules_to_save=[lm_head]), or train.modules_to_save_lr=null"
            )
        if (
            self.train.token_rows_lr is not None
            and self.lora.train_untrained_tokens == "off"
            and not self.data.add_special_tokens
        ):
            raise ValueError(
                "train.token_rows_lr sets the rate of the token rows lorafuse trains, and this run trains none "
                "(lora.train_untrained_tokens=off, no data.add_special_tokens): set lora.train_untrained_tokens=auto, "
                "or train.token_rows_lr=null"
            )
        return self

    @model_validator(mode="after")
    def _preference_pairs(self) -> RunConfig:
        pairs, objective = self.data.format == "preference", self.train.objective
        if pairs != (objective in ("dpo", "orpo")):
            raise ValueError(
                f"train.objective={objective} with data.format={self.data.format}: dpo and orpo train on "
                "preference pairs, sft on the other formats. Set both: train.objective=dpo (or orpo) with "
                "data.format=preference, or train.objective=sft with an SFT format"
            )
        impl = self.model.attn_implementation
        if pairs and self.train.shared_prompt == "on" and impl not in (None, "sdpa", "eager"):
            raise ValueError(
                f"train.shared_prompt=on needs an attention that takes a 4-D mask; model.attn_implementation={impl} "
                "does not: set model.attn_implementation to sdpa (or eager), or train.shared_prompt to auto or off"
            )
        if pairs and (self.data.packing or not self.data.completion_only):
            raise ValueError(
                "data.format=preference trains on the response tokens of whole pairs: set data.packing=false "
                "and data.completion_only=true"
            )
        return self


def options_for(tc: TrainConfig, experimental: ExperimentalConfig | None = None) -> Options:
    """The Options of a run's train section (and experimental section; None: its defaults)."""
    kernel = kernel_options(tc.fp8, tc.dequant_cap_mib, experimental)
    return Options(
        fast_path=tc.fast_path,
        cuda_graphs=tc.cuda_graphs,
        gradient_checkpointing=tc.gradient_checkpointing,
        uncheckpointed_layers=tc.uncheckpointed_layers,
        embeddings_on_host=tc.embeddings_on_host,
        head_on_host=tc.head_on_host,
        kernel=kernel,
    )


def kernel_options(fp8: bool, dequant_cap_mib: int, experimental: ExperimentalConfig | None = None) -> KernelOptions:
    """The fused kernels' options of train.fp8, train.dequant_cap_mib and the experimental section (None: defaults)."""
    experimental = experimental or ExperimentalConfig()
    return KernelOptions(
        fp8=fp8,
        dequant_cap_bytes=dequant_cap_mib << 20,
        fused_ds_db=experimental.fused_ds_db,
    )


def demo_config() -> RunConfig:
    """The built-in demo (lorafuse/demo.py): a tiny random Llama learns to translate simple sentences between
    Japanese and English from the bundled rows, within a few minutes on a CPU, and stops at its best eval loss."""
    return RunConfig(
        model=ModelConfig(path=BUILTIN_MODEL, quant="none", compute_dtype="float32"),
        # The random-init head caps the logits (|h| |w_y| ~ 11 x 0.23 at init std 0.02): with it frozen the loss
        # barely moves whatever LoRA learns. Training the tiny head (V x 128) too lets the demo learn the word
        # mapping in ~150 steps. A pretrained model needs no such thing.
        lora=LoraConfig(r=8, alpha=16, dropout=0.0, modules_to_save=["lm_head"]),
        data=DataConfig(path=BUILTIN_DATA, format="dolly-ja", max_length=64, val_size=0.1),
        train=TrainConfig(
            max_steps=400,
            micro_batch_size=8,
            grad_accum=1,
            lr=3e-3,
            warmup_steps=5,
            optimizer="adamw",
            gradient_checkpointing=False,
            eval_every=25,
            save_every=50,
            # a held-out loss that no longer falls by 0.01 in two evaluations: the mapping is learned
            early_stopping_patience=2,
            early_stopping_min_delta=0.01,
            log_every=10,
            device="auto",
        ),
        output=OutputConfig(dir="runs/demo"),
    )


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read `path` (None: the demo), apply "a.b=value" overrides (values parsed as YAML), validate."""
    if path is None:
        raw, source = demo_config().model_dump(mode="json"), "the built-in demo config"
    else:
        raw, source = read_yaml_mapping(Path(path)), str(path)
        for section in SECTIONS:  # an empty `lora:` section means "all defaults", not null
            if section in raw and raw[section] is None:
                raw[section] = {}
    from_cli = set()
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
        from_cli.add(key)
    return validate_config(raw, source=source, from_cli=from_cli)


def validate_config(raw: dict, source: str = "config", from_cli: typing.Iterable[str] = ()) -> RunConfig:
    """Validate a plain dict into a RunConfig, or raise one ConfigError that lists every problem."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise validation_error_to_config_error(exc, source, set(from_cli), RunConfig) from None


def _split_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {item!r} is not of the form key=value",
            "write dotted keys with a value, e.g. lora.r=32 or train.max_steps=null",
        )
    check_key_path(key, f"override {item!r}", RunConfig)
    return key, parse_override_value(text)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # the override wins over a non-mapping value in the file
        node = node[part]
    node[leaf] = value


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{"train.lr": 0.0002, ...}: one entry per leaf key (dicts such as data.fields stay whole)."""
    out: dict[str, Any] = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out


def _fmt(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def config_diff(a: RunConfig, b: RunConfig, ignore: typing.Iterable[str] = RESUME_MUTABLE_KEYS) -> list[str]:
    """Lines "train.lr: 0.0002 -> 0.0003" for each key that differs, skipping `ignore` (pass () for all)."""
    fa, fb, skip = flatten(a), flatten(b), set(ignore)
    return [f"{k}: {_fmt(fa[k])} -> {_fmt(fb[k])}" for k in fa if k not in skip and fa[k] != fb[k]]


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, in section and field order (what `save_config` writes)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the config as YAML atomically (temp file, fsync, rename): a crash never leaves half a file."""
    return write_atomic(path, config_to_yaml(cfg))

"""The sections of the run configuration (model, lora, data, output, experimental; train in config_train.py):
pydantic v2 models with `extra="forbid"` and one description per field (docs/config.md is generated from them).
lorafuse/config.py joins them into the RunConfig and loads, overrides, compares and saves it.

A section rejects a boolean where a number is meant (pydantic would read `r: true` as 1), inf and NaN, and expands `~`
and $VARIABLES in its paths (an unset variable is an error rather than a literal folder name).
"""

from __future__ import annotations

import os
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafuse.builtin import BUILTIN_DATA, BUILTIN_MODEL

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expand_path(value: str | None) -> str | None:
    """`~` and environment variables in a path expanded; an unset variable is an error, since it would otherwise
    become a literal folder name (`$SCRATCH/runs` made under the current folder). `builtin:` names stay as given."""
    if value is None or value.startswith("builtin:"):
        return value
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.search(r"\$\{?([A-Za-z_]\w*)", expanded)
    if unset:
        raise ValueError(
            f"uses the environment variable ${unset.group(1)}, which is not set: set it, or write the path"
        )
    return expanded


class _Section(BaseModel):
    # allow_inf_nan=False: `train.lr: .inf` must fail here, not train to an all-NaN adapter
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        # pydantic's lax mode turns `r: true` into 1; a boolean for a number is always a mistake.
        kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError("must be a number, not true/false")
        return value


class ModelConfig(_Section):
    """The base model and how it is loaded."""

    path: str = Field(
        description="Hugging Face hub id or local folder of the base model "
        f"(`{BUILTIN_MODEL}` builds a tiny random model for trying lorafuse on a CPU)."
    )
    quant: Literal["nf4", "none"] = Field(
        "nf4", description="`nf4`: QLoRA, base linears stored in 4-bit NormalFloat; `none`: LoRA on a 16/32-bit base."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of matmuls and activations. `auto`: bfloat16 where the GPU supports it, "
        "float16 on older GPUs (T4, V100), float32 on a CPU.",
    )
    double_quant: bool = Field(True, description="Quantize the NF4 block scales too (saves ~0.37 bit/param).")
    blocksize: int = Field(64, description="NF4 block size (weights per scale): a power of two, 32 to 4096.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository to run.")
    attn_implementation: str | None = Field(
        None,
        description="transformers attention backend "
        "(`sdpa`, `eager`, `flash_attention_2`); null: transformers' default.",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_path(value)

    @field_validator("blocksize")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 32 or value > 4096 or value & (value - 1):
            raise ValueError("must be a power of two from 32 to 4096 (64 is bitsandbytes' default)")
        return value


class LoraConfig(_Section):
    """The adapter: W' = W + (alpha/r) B A on each targeted linear layer."""

    r: int = Field(
        16,
        ge=1,
        description="LoRA rank (A is r x in, B is out x r). 8 general, 16 recommended, 32-64 for large changes.",
    )
    alpha: float = Field(
        32.0,
        gt=0,
        description="Scale numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora). Rule of thumb: 2 x r.",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input; 0.1 against overfitting.")
    targets: str | list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        description=(
            "Which linear layers get adapters: a list of module names (each matching the end of a full module "
            "name, as in peft), `all-linear` (every linear except the output head), or one regex that must match "
            "a full module name."
        ),
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")
    dora: bool = Field(False, description="DoRA: learn a per-output magnitude vector as well.")
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the "
        "adapter (e.g. `[lm_head]`); this makes the adapter much larger.",
    )
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="Initialisation of A (B starts at zero, so training starts from the base model)."
    )
    train_untrained_tokens: Literal["auto", "off"] = Field(
        "auto",
        description="auto: before training, find the tokens the data uses whose input-embedding or output-head rows "
        "look untrained (all zero, 100x below the median row norm, or (nearly) equal to 2+ other rows: Llama-3 base's "
        "<|eot_id|> and <|start_header_id|>, for one), start those rows around the trained rows "
        "(lora.token_row_init) and train them with the adapter (saved as peft's trainable_token_indices); a chat "
        "template's <|...|> markers that the vocabulary lacks are added as new tokens. off: leave every existing "
        "row as it is (the run still reports what it finds; tokens from data.add_special_tokens are trained "
        "either way). docs/tokens.md.",
    )

    token_row_init: Literal["sample", "mean"] = Field(
        "sample",
        description="Where the untrained and new token rows that lorafuse trains start. sample: each input-embedding "
        "row drawn from a normal distribution with the trained rows' mean and per-dimension spread (rows that look "
        "trained and differ from each other; drawn from train.seed), each output-head row at the mean of the trained "
        "head rows (a typical starting probability). mean: every row at the mean of the trained rows, as Unsloth and "
        "Axolotl start them (identical input rows: the model cannot tell those tokens apart until training separates "
        "them). docs/tokens.md.",
    )

    @field_validator("train_untrained_tokens", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML 1.1 reads a bare `off` as false: take it as the word the user typed."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("targets", mode="before")
    @classmethod
    def _check_targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must not be empty; use `all-linear` or a list such as [q_proj, v_proj]")
            if value != "all-linear":
                import re

                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"is not a valid regex ({exc})") from None
            return value
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError("must be a non-empty list of module names, e.g. [q_proj, v_proj]")
            return value
        raise ValueError("must be `all-linear`, a list of module names, or a regex string")


class DataConfig(_Section):
    """The training data and how rows become token sequences."""

    path: str = Field(
        description="JSONL/JSON/CSV/Parquet file, folder, or hub data set id "
        f"(`{BUILTIN_DATA}`: the bundled sample rows)."
    )
    format: Literal[
        "alpaca", "dolly", "dolly-ja", "sharegpt", "messages", "prompt-completion", "text", "preference"
    ] = Field(
        "alpaca",
        description="Row layout: alpaca (instruction/input/output), dolly (instruction/context/"
        "response), dolly-ja (instruction/input/output with Japanese headings), sharegpt "
        "(conversations), messages (OpenAI role/content), prompt-completion, text (raw text), preference "
        "(prompt/chosen/rejected pairs for train.objective dpo or orpo: strings, or TRL's message lists).",
    )
    prompt_format: Literal["raw", "alpaca", "dolly", "dolly-ja"] = Field(
        "raw",
        description="data.format=preference with data.template=plain: how the prompt is written before the "
        "response. raw: the prompt text as given (instruction and input joined by a blank line); alpaca/dolly/"
        "dolly-ja: that format's headings around it, as the SFT run that made the model saw its prompts. "
        "With data.template=chat the tokenizer's chat template renders the prompt instead.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns: our field name -> "
        "the file's column name, e.g. `{instruction: question, output: answer}`.",
    )
    max_length: int = Field(
        512,
        ge=16,
        description="Tokens per sequence; longer rows are truncated "
        "(`lorafuse data preview` shows the length statistics).",
    )
    val_size: float = Field(
        0.0,
        ge=0,
        description="Validation split held out of `path`: a fraction (< 1) or a row count (>= 1). 0: no split.",
    )
    val_path: str | None = Field(None, description="A separate validation file (instead of val_size).")
    completion_only: bool = Field(True, description="Train only on the response tokens (prompt tokens masked).")
    packing: bool = Field(False, description="Pack several rows per sequence (no cross-row attention).")
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="Prompt rendering: the tokenizer's "
        "chat template, the format's plain template, or auto "
        "(chat when the tokenizer has a template).",
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation.")
    add_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens to add to the tokenizer, e.g. ['<|im_start|>', '<|im_end|>'] for a ChatML template on a "
        "base without them: the embedding and output head grow by a row each, started around the trained "
        "rows and trained with the adapter; the adapter folder carries the tokenizer and the rows (docs/tokens.md: "
        "loading them with peft).",
    )
    split: str = Field("train", description="Split to read from a hub data set.")
    num_rows: int | None = Field(None, ge=1, description="Use only the first N rows (quick trials).")
    shuffle: bool = Field(True, description="Shuffle rows each epoch (seeded, so resumable).")
    cache_dir: str | None = Field(None, description="Where tokenized data is cached; null: <output.dir>/.cache.")

    @field_validator("path", "val_path", "cache_dir")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return expand_path(value)

    @field_validator("val_size")
    @classmethod
    def _whole_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a row count (>= 1) must be a whole number; use a fraction < 1 for a share")
        return value

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.val_path and self.val_size:
            raise ValueError(
                "data.val_path and data.val_size are both set: set one of them (data.val_size=0 to use the file)"
            )
        return self


class OutputConfig(_Section):
    """Where the run writes checkpoints, the adapter, logs and plots."""

    dir: str = Field(
        "runs/lorafuse",
        description="Run folder: checkpoint-N/, adapter/, metrics.jsonl, plots. A new or empty folder, or an earlier "
        "run's (which it resumes); a folder holding other files is refused.",
    )

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_path(value)


class ExperimentalConfig(_Section):
    """A/B switches of changes not yet measured to win; each may become the default or be deleted."""

    fused_ds_db: bool = Field(
        False,
        description="On the fast path, form a LoRA linear's dS and dB from one read of dY in one Triton kernel "
        "instead of two cuBLAS GEMMs (saves one read of dY per projection, adds two small reductions). Not yet "
        "measured faster.",
    )


_UNION = (typing.Union, types.UnionType)


def _leaf_types(annotation: Any) -> set:
    """Concrete types inside an annotation: `int | None` -> {int, NoneType}; a Literal stays itself."""
    if typing.get_origin(annotation) in _UNION:
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation)))
    return {annotation}

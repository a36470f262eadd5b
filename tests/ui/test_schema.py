"""The run form's fields come from the config models, and form values turn back into the same config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from lorafuse.config import RunConfig, demo_config, flatten, load_config, validate_config
from lorafuse.errors import ConfigError
from lorafuse.ui.schema import form_fields, raw_config, widget_values

ROOT = Path(__file__).resolve().parents[2]
SPECS = form_fields()


def _round_trip(cfg: RunConfig) -> RunConfig:
    return validate_config(raw_config(SPECS, widget_values(SPECS, cfg)))


def test_every_config_key_has_exactly_one_field():
    keys = [s.key for s in SPECS]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(flatten(demo_config()))


@pytest.mark.parametrize("name", ["demo"] + sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_shipped_configs_survive_the_form(name):
    cfg = demo_config() if name == "demo" else load_config(ROOT / "examples" / name)
    assert _round_trip(cfg) == cfg


def test_values_of_every_kind_survive_the_form():
    cfg = validate_config(
        {
            "model": {"path": "some/model", "quant": "nf4", "attn_implementation": "sdpa", "blocksize": 128},
            "lora": {"r": 32, "alpha": 12.5, "targets": "all-linear", "modules_to_save": ["lm_head", "embed_tokens"]},
            "data": {
                "path": "data.jsonl",
                "format": "dolly-ja",
                "fields": {"instruction": "question", "output": "answer"},
                "system_prompt": "You are: helpful",
                "num_rows": 7,
                "val_size": 0.25,
            },
            "train": {
                "max_steps": 9,
                "lr": 2e-5,
                "max_grad_norm": None,
                "gradient_checkpointing": "offload",
                "eval_every": 3,
                "early_stopping_patience": 2,
                "report_to": ["tensorboard", "mlflow"],
                "fast_path": "off",
            },
            "output": {"dir": "runs/x y"},
        }
    )
    assert _round_trip(cfg) == cfg
    off = cfg.model_copy(deep=True)
    off.train.gradient_checkpointing = False
    off.lora.targets = "q_proj|v_proj"  # a regex string, not a list
    assert _round_trip(off) == off


def _values(**changes) -> list:
    values = widget_values(SPECS, demo_config())
    for key, value in changes.items():
        values[[s.key for s in SPECS].index(key.replace("__", "."))] = value
    return values


def test_widget_values_read_as_the_cli_reads_them():
    raw = raw_config(
        SPECS,
        _values(
            train__max_steps="",  # an empty box of a nullable number is null
            train__eval_every="25",
            lora__targets="[q_proj, v_proj]",
            train__gradient_checkpointing="true",
            lora__r=16.0,  # a browser number box sends floats
        ),
    )
    cfg = validate_config(raw)
    assert cfg.train.max_steps is None and cfg.train.eval_every == 25
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.train.gradient_checkpointing is True
    assert raw["lora"]["r"] == 16 and isinstance(raw["lora"]["r"], int)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [("lora__r", 0, "lora.r"), ("train__max_steps", "ten", "train.max_steps"), ("lora__r", 2.5, "lora.r")],
)
def test_a_bad_value_fails_validation_naming_its_key(key, value, said):
    with pytest.raises(ConfigError) as err:
        validate_config(raw_config(SPECS, _values(**{key: value})))
    assert said in err.value.problem


def test_fields_carry_description_type_and_range():
    spec = {s.key: s for s in SPECS}
    assert spec["lora.dropout"].constraint == "number ≥ 0 and < 1"
    assert spec["train.max_steps"].constraint == "integer ≥ 1, or empty for null"
    assert spec["model.path"].constraint == "text (required)"
    assert list(spec["train.gradient_checkpointing"].words) == ["true", "false", "offload"]
    assert spec["lora.r"].description == RunConfig.model_fields["lora"].annotation.model_fields["r"].description
    assert spec["train.report_to"].widget == "checkboxes" and spec["lora.r"].widget == "number"


def test_a_new_section_or_key_appears_by_itself():
    class Extra(BaseModel):
        depth: int = Field(3, ge=2, description="how deep")
        mode: Literal["a", "b"] | None = Field(None, description="which mode")

    class Top(BaseModel):
        extra: Extra = Field(default_factory=Extra)
        names: list[str] = Field(default_factory=list)

    specs = {s.key: s for s in form_fields(Top)}
    assert list(specs) == ["extra.depth", "extra.mode", "names"]
    assert specs["extra.depth"].constraint == "integer ≥ 2" and specs["extra.depth"].widget == "number"
    assert list(specs["extra.mode"].words) == ["a", "b", "null"] and specs["names"].kind == "yaml"
    raw = raw_config(list(specs.values()), [5, "null", "[x, y]"])
    assert Top.model_validate(raw) == Top(extra=Extra(depth=5, mode=None), names=["x", "y"])

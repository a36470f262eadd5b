"""Config: seed defaults, unknown keys with suggestions, ranges, YAML errors, overrides, diff, save/load."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from lorafuse.config import (
    RunConfig,
    config_diff,
    demo_config,
    load_config,
    save_config,
)
from lorafuse.config_reference import config_reference_markdown
from lorafuse.errors import ConfigError

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


MINIMAL = """
model:
  path: some/model
data:
  path: data.jsonl
"""


def test_defaults_are_the_seed_recipe():
    cfg = RunConfig(model={"path": "m"}, data={"path": "d"})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (16, 32, 0.05, SEVEN)
    assert (cfg.model.quant, cfg.model.double_quant, cfg.model.blocksize) == ("nf4", True, 64)
    assert (cfg.train.lr, cfg.train.optimizer) == (2e-4, "paged_adamw_8bit")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.max_length) == (4, 4, 512)
    assert cfg.data.completion_only is True


def test_demo_config_is_builtin_and_loaded_without_a_path():
    cfg = demo_config()
    assert cfg.model.path == "builtin:tiny-llama" and cfg.data.path == "builtin:demo"
    assert cfg.model.quant == "none" and cfg.train.optimizer == "adamw"
    assert load_config(None) == cfg


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("lora:\n  rank: 8\n", "did you mean 'lora.r'?"),
        ("train:\n  learning_rate: 1.0e-4\n", "did you mean 'train.lr'?"),
        ("train:\n  micro_bach_size: 2\n", "did you mean 'train.micro_batch_size'?"),
        ("lora:\n  lr: 1.0e-4\n", "did you mean 'train.lr'?"),  # right name, wrong section
        ("epochs: 3\n", "did you mean 'train.epochs'?"),  # top level
        ("loar:\n  r: 8\n", "did you mean 'lora'?"),  # misspelt section
        ("data:\n  path: d.jsonl\n  max_seq_length: 1024\n", "did you mean 'data.max_length'?"),
    ],
)
def test_unknown_key_in_yaml_suggests_nearest(tmp_path, yaml_text, expected):
    base = "model:\n  path: some/model\n" if yaml_text.startswith("data:") else MINIMAL
    path = write(tmp_path, base + yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "unknown key" in info.value.problem
    assert expected in info.value.problem
    assert str(path) in info.value.problem


def test_unknown_key_via_override_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), ["lora.rank=32"])
    assert "unknown key 'lora.rank'" in info.value.problem
    assert "did you mean 'lora.r'?" in info.value.problem
    assert "lora.r=" in info.value.fix


def test_override_into_a_scalar_and_malformed_override_are_errors(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="'lora.r' is a value, not a section"):
        load_config(path, ["lora.r.x=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["lora.r"])


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("lora.r=0", ">= 1"),
        ("lora.alpha=0", "> 0"),
        ("lora.dropout=1.0", ">= 0 and < 1"),
        ("lora.dropout=-0.1", ">= 0 and < 1"),
        ("train.lr=0", "> 0"),
        ("train.micro_batch_size=0", ">= 1"),
        ("train.grad_accum=0", ">= 1"),
        ("train.epochs=0", "> 0"),
        ("train.save_total_limit=0", ">= 1"),
        ("data.max_length=8", ">= 16"),
        ("data.val_size=-1", ">= 0"),
        ("model.blocksize=48", "power of two from 32 to 4096"),
        ("model.blocksize=8192", "power of two from 32 to 4096"),
        ("data.val_size=2.5", "whole number"),
        ("train.warmup_steps=10.5", "whole number"),
    ],
)
def test_out_of_range_names_key_value_and_allowed(tmp_path, override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), [override])
    assert f"{key} = {value}" in info.value.problem
    assert allowed in info.value.problem
    assert "set on the command line" in info.value.problem


def test_boundary_values_are_accepted(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "lora.dropout=0",
            "model.blocksize=32",
            "data.max_length=16",
            "lora.r=1",
            "data.val_size=0.999",
            "data.val_size=100",
        ],
    )
    assert (cfg.lora.dropout, cfg.model.blocksize, cfg.data.max_length, cfg.data.val_size) == (0, 32, 16, 100)
    assert load_config(write(tmp_path, MINIMAL), ["model.blocksize=4096"]).model.blocksize == 4096


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.r=abc", "must be a whole number"),
        ("lora.r=2.5", "must be a whole number"),
        ("lora.r=true", "not true/false"),
        ("train.gradient_checkpointing=maybe", "must be true or false"),
        ("train.optimizer=adam", "did you mean 'adamw'?"),
        ("model.quant=int4", "allowed values are 'nf4' or 'none'"),
        ("lora.targets=[]", "non-empty list"),
        ("lora.targets=q_proj(", "not a valid regex"),
    ],
)
def test_wrong_types_and_choices(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), [override])
    assert override.split("=")[0] in info.value.problem
    assert message in info.value.problem


def test_every_problem_is_listed_in_one_error(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  rank: 8\n  dropout: 2\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problem = info.value.problem
    assert "3 problems" in problem
    for part in ("'lora.rank'", "lora.dropout = 2", "train.lr = -1"):
        assert part in problem
    assert "Input should be" not in problem and "errors.pydantic.dev" not in problem


def test_missing_required_sections(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "lora:\n  r: 8\n"))
    assert "'model' is required" in info.value.problem and "'data' is required" in info.value.problem


def test_cross_key_checks(tmp_path):
    with pytest.raises(ConfigError, match="eval_every is set but there is no validation data"):
        load_config(write(tmp_path, MINIMAL), ["train.eval_every=50"])
    with pytest.raises(ConfigError, match="val_path and data.val_size are both set"):
        load_config(write(tmp_path, MINIMAL), ["data.val_path=v.jsonl", "data.val_size=0.1"])
    cfg = load_config(write(tmp_path, MINIMAL), ["train.eval_every=50", "data.val_size=0.05"])
    assert cfg.train.eval_every == 50


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(
        tmp_path,
        """
        model:
          path: some/model
        lora:
          r: [8, 16
        data:
          path: d.jsonl
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.problem
    assert "line 5" in info.value.problem  # PyYAML detects the unclosed list where `data:` starts


def test_yaml_tab_indentation_names_the_line(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("model:\n  path: m\ndata:\n\tpath: d\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4" in info.value.problem and "tabs" in info.value.fix


def test_duplicate_key_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  r: 8\n  alpha: 16\n  r: 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'r'" in info.value.problem
    assert "line 8" in info.value.problem and "first set at line 6" in info.value.problem


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("- a\n- b\n", "not a mapping"),
    ],
)
def test_unusable_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_exponent_floats_and_empty_sections(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "train:\n  lr: 3e-4\nlora:\n"))
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.r == 16  # an empty `lora:` section means all defaults


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  max_steps: 100\n")
    cfg = load_config(
        path,
        [
            "lora.r=32",
            "lora.targets=[q_proj,v_proj]",
            "train.max_steps=null",
            "train.lr=1e-4",
            "data.system_prompt=You are: helpful",
            "model.path=org/name",
            "data.fields.instruction=question",
        ],
    )
    assert cfg.lora.r == 32 and isinstance(cfg.lora.r, int)
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None
    assert cfg.train.lr == 1e-4
    assert cfg.data.system_prompt == "You are: helpful"
    assert cfg.model.path == "org/name"
    assert cfg.data.fields == {"instruction": "question"}
    assert load_config(path, ["lora.targets=all-linear"]).lora.targets == "all-linear"


def test_overrides_apply_to_the_demo():
    cfg = load_config(None, ["lora.r=4", "train.max_steps=10"])
    assert (cfg.lora.r, cfg.train.max_steps, cfg.model.path) == (4, 10, "builtin:tiny-llama")


def test_config_diff_lines_and_resume_mutable_keys():
    a = demo_config().model_copy(update={"train": demo_config().train.model_copy(update={"max_steps": 80})})
    b = a.model_copy(deep=True)
    b.train.lr = 3e-3 * 2
    b.lora.targets = ["q_proj"]
    b.train.max_steps = 500  # extending a run is allowed on resume
    b.output.dir = "elsewhere"
    assert config_diff(a, b) == [
        'lora.targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] -> ["q_proj"]',
        "train.lr: 0.003 -> 0.006",
    ]
    full = config_diff(a, b, ignore=())
    assert "train.max_steps: 80 -> 500" in full and 'output.dir: "runs/demo" -> "elsewhere"' in full
    assert config_diff(a, a.model_copy(deep=True)) == []


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["lora.targets=all-linear", "data.fields.output=answer", "data.system_prompt=日本語で"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(out) == cfg
    save_config(demo_config(), out)  # replaces the file in place
    assert load_config(out) == demo_config()
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_assignment_is_validated():
    cfg = demo_config()
    with pytest.raises(ValidationError):
        cfg.lora.r = 0  # the trainer adjusting a value (auto_fit) cannot make the config invalid


def test_reference_markdown_covers_every_field():
    text = config_reference_markdown()
    for section, field in RunConfig.model_fields.items():
        assert f"### `{section}`" in text
        for name, info in field.annotation.model_fields.items():
            assert info.description and len(info.description) > 10, f"{section}.{name} lacks a description"
            assert f"| `{section}.{name}` |" in text
    assert "| `lora.r` | int | `16` |" in text
    assert "| `model.path` | str | required |" in text


def test_preference_objectives_need_preference_data(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train.objective=dpo", "data.format=preference"])
    assert (cfg.train.beta, cfg.train.dpo_loss, cfg.train.dpo_reference) == (0.1, "sigmoid", "live")
    assert (cfg.train.orpo_lambda, cfg.data.prompt_format) == (0.1, "raw")
    for overrides in (["train.objective=orpo"], ["data.format=preference"]):
        with pytest.raises(ConfigError, match="dpo and orpo train on preference pairs, sft on the other formats"):
            load_config(path, overrides)
    with pytest.raises(ConfigError, match="set data.packing=false"):
        load_config(path, ["train.objective=dpo", "data.format=preference", "data.packing=true"])
    with pytest.raises(ConfigError, match="train.dpo_loss"):
        load_config(path, ["train.objective=dpo", "data.format=preference", "train.dpo_loss=hinge"])

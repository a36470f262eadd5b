"""The README's config reference is generated from the models; its commands match .ci/run and the CLI."""

from __future__ import annotations

from pathlib import Path

from lorafuse.config_reference import config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_generated_from_the_models():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == config_reference_markdown().strip(), (
        "README config reference is stale: run `python -m lorafuse.config --reference`"
    )


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert "torch==2.13.0" in readme and "torch==2.13.0" in ci


def test_readme_seed_yaml_equals_the_example():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "llama2-7b-dolly-ja-qlora.yaml").read_text(encoding="utf-8")
    assert example.strip() in readme

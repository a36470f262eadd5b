"""The form's checks: validation as the CLI does it, the planner's verdict, the data preview, where a form starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lorafuse.config import load_config, save_config
from lorafuse.data import demo_data_path
from lorafuse.ui.checks import DEMO, load_source, preview_html, sources, validate, verdict

ROOT = Path(__file__).resolve().parents[2]


def test_verdict_says_whether_it_fits_the_chosen_card_or_memory(tmp_path):
    demo = load_source(DEMO, tmp_path)
    assert verdict(demo, "T4", None).startswith("**fits**")
    assert verdict(demo, "T4", "0.25GiB").startswith("**does NOT fit**")
    qlora = load_config(ROOT / "examples" / "llama2-7b-dolly-ja-qlora.yaml")
    assert verdict(qlora, "T4", None).startswith("**fits**")
    text = verdict(qlora, "T4", "5GiB")
    assert text.startswith("**does NOT fit**") and "fastest setting that fits" in text
    assert "lorafuse train CONFIG train.micro_batch_size=" in text  # the command that applies the suggestion
    if not torch.cuda.is_available():
        assert "pick a card or a memory size" in verdict(demo, None, None)


def test_validate_reports_the_cli_error():
    cfg, error = validate({"model": {"path": "m"}, "data": {"path": "d"}, "lora": {"rank": 8}})
    assert cfg is None and "lora.rank" in error and "lora.r" in error  # the nearest valid key


def test_preview_marks_trained_and_masked_tokens(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    cfg = load_source(DEMO, tmp_path)
    cfg.model.path = str(tiny_model_dir)
    html = preview_html(cfg, n=1, cache_dir=tmp_path / "ui-cache")
    assert not Path(cfg.output.dir).exists()  # the run to come finds its folder empty
    spans = re.findall(r'<span style="([^"]*)">([^<]*)</span>', html)
    trained = {text for style, text in spans if "font-weight: bold" in style}
    masked = {text for style, text in spans if "font-weight: bold" not in style}
    outputs = {json.loads(line)["output"] for line in demo_data_path().read_text(encoding="utf-8").splitlines()}
    assert trained & outputs  # the shown demo row's response
    assert any("### 指示:" in t for t in masked)  # the demo's dolly-ja prompt
    assert "statistics" in html


def test_a_form_starts_from_the_demo_an_example_or_a_run(tmp_path):
    runs = tmp_path / "runs"
    names = sources(runs)
    assert names[0] == DEMO and any(n.endswith("tiny-cpu.yaml") for n in names)
    assert load_source(DEMO, runs).output.dir == str((runs / "demo").resolve())
    example = next(n for n in names if n.endswith("tiny-cpu.yaml"))
    assert load_source(example, runs).output.dir == str((runs / "tiny-cpu").resolve())
    cfg = load_source(DEMO, runs)
    cfg.output.dir = "/somewhere/else/mine"  # a run folder that was moved
    (runs / "mine").mkdir(parents=True)
    save_config(cfg, runs / "mine" / "config.yaml")
    assert str(runs / "mine" / "config.yaml") in sources(runs)
    assert load_source(str(runs / "mine" / "config.yaml"), runs).output.dir == str((runs / "mine").resolve())

"""`lorafuse train` with no config: the built-in demo runs offline, its loss falls visibly, and it ends with the
before/after table of held-out prompts; as shipped (slow), it learns the held-out translations and stops at its best
eval loss with that checkpoint's adapter."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from lorafuse.cli import main


def test_demo_trains_offline_and_the_loss_falls(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    # The demo as shipped, shortened to 60 steps to keep the suite quick.
    assert main(["train", "train.max_steps=60", "train.eval_every=30", "train.save_every=30"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "runs/demo/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 5
    # a visibly learning run loses more than a nat within 60 steps
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0, losses
    assert (tmp_path / "runs/demo/adapter/adapter_model.safetensors").is_file()
    assert "trainable params:" in out and "held-out prompts (not in the training rows)" in out
    assert out.count("    before: ") == 4 and out.count("    after:  ") == 4
    demo = json.loads((tmp_path / "runs/demo/summary.json").read_text())["demo"]
    assert demo["total"] == 80 and demo["shown"] == 4 and demo["base_exact"] == 0
    assert "try others: lorafuse chat --model builtin:tiny-llama --adapter runs/demo/adapter" in out


@pytest.mark.slow
def test_the_demo_as_shipped_learns_the_held_out_translations(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs/demo/summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and "early stopping:" in out
    # nearly every held-out sentence (never trained, in either direction) comes out exactly right; none before
    assert summary["demo"]["exact"] >= 0.95 * summary["demo"]["total"], summary["demo"]
    assert summary["demo"]["base_exact"] == 0
    best = tmp_path / "runs/demo" / f"checkpoint-{summary['best_step']}"
    kept, final = (
        load_file(str(p / "adapter_model.safetensors")) for p in (best / "adapter", tmp_path / "runs/demo/adapter")
    )
    assert kept.keys() == final.keys() and all((kept[k] == final[k]).all() for k in kept)
    assert main(["train"]) == 0  # the same command again: the finished run is kept
    assert "already complete" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs/demo/summary.json").read_text()) == summary

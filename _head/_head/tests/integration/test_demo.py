"""`lorafuse train` with no config: the built-in demo runs offline and its loss falls visibly."""

from __future__ import annotations

import json

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
    # ln(2048) = 7.6 at the start; a visibly learning run loses more than a nat within 60 steps.
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0, losses
    assert (tmp_path / "runs/demo/adapter/adapter_model.safetensors").is_file()
    assert "demo prompt" in out and "trainable params:" in out

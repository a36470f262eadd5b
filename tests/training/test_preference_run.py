"""DPO and ORPO through the job and the loop (train.objective): metrics, exact resume, the reference set-up, OOM.

The runs are examples/tiny-dpo-cpu.yaml made small: the tiny random Llama of tests/conftest.py with a fresh adapter,
20 of the bundled preference pairs to train on and 4 held out, 6 steps of 4 pairs.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lorafuse.config import TrainConfig, validate_config
from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.errors import ConfigError
from lorafuse.job import run
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.training import reference
from lorafuse.training.loop import TrainingLoop
from lorafuse.training.objectives.dpo import DPOObjective
from lorafuse.training.oom import split_batch

PAIR_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen")
VOLATILE = ("tokens_per_s", "memory_mb", "time_s")


def _cfg(model_dir, out, **train):
    return validate_config(
        {
            "model": {"path": str(model_dir), "quant": "none", "compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"]},
            "data": {
                "path": "builtin:preference",
                "format": "preference",
                "prompt_format": "alpaca",
                "max_length": 96,
                "num_rows": 24,
                "val_size": 4,
            },
            "train": {
                "objective": "dpo",
                "max_steps": 6,
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 5e-3,
                "warmup_steps": 1,
                "optimizer": "adamw",
                "gradient_checkpointing": False,
                "eval_every": 3,
                "save_every": 3,
                "log_every": 1,
                "device": "cpu",
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=250), buf


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _stop_after(monkeypatch, step: int) -> None:
    """SIGTERM to this process right after optimizer step `step`, as a scheduler would send it."""
    real = TrainingLoop.step

    def step_then_signal(self, batches):
        row = real(self, batches)
        if self.state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(TrainingLoop, "step", step_then_signal)


@pytest.mark.parametrize("ref", ["live", "precomputed"])
def test_dpo_run_logs_rewards_and_a_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch, ref):
    console, printed = _console()
    full = run(_cfg(tiny_model_dir, tmp_path / "full", dpo_reference=ref), console=console)
    assert full.stop_reason == "finished" and full.steps == 6
    rows = _rows(tmp_path / "full")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7)) and [r["step"] for r in evals] == [3, 6]
    assert all(k in r for r in train_rows for k in PAIR_KEYS) and all(
        f"eval_{k}" in r for r in evals for k in PAIR_KEYS
    )
    assert train_rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # a fresh adapter: policy == reference
    assert train_rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert len({r["rewards/margin"] for r in train_rows}) == 6  # the margins move
    assert "eval_ppl" not in evals[0] and (tmp_path / "full" / "loss.png").is_file()

    _stop_after(monkeypatch, 3)
    cut = run(_cfg(tiny_model_dir, tmp_path / "cut", dpo_reference=ref), console=console)
    assert cut.stop_reason == "signal" and cut.steps == 3
    monkeypatch.undo()
    if ref == "precomputed":  # the resume reads the checkpoint's reference instead of recomputing it
        monkeypatch.setattr(reference, "precompute_reference_logps", lambda *a: pytest.fail("recomputed"))
    resumed = run(_cfg(tiny_model_dir, tmp_path / "cut", dpo_reference=ref), console=console)
    assert resumed.stop_reason == "finished" and "resuming from" in printed.getvalue()
    assert _rows(tmp_path / "cut") == rows  # every loss, reward, margin and eval, bit for bit
    if ref == "precomputed":
        saved = load_file(str(tmp_path / "full" / "reference_logps.safetensors"))
        assert set(saved) == {"train", "val"} and saved["train"].shape == (40,) and saved["val"].shape == (8,)
        kept = load_file(str(tmp_path / "cut" / "checkpoint-3" / "reference_logps.safetensors"))
        assert all(torch.equal(saved[k], kept[k]) for k in saved)
        assert bool(torch.isfinite(saved["train"]).all()) and saved["train"].std() > 0


def test_orpo_run_logs_its_metrics(tmp_path, tiny_model_dir):
    res = run(
        _cfg(tiny_model_dir, tmp_path / "orpo", objective="orpo", max_steps=2, eval_every=2), console=_console()[0]
    )
    rows = _rows(tmp_path / "orpo")
    assert res.stop_reason == "finished"
    assert all(k in rows[0] for k in ("nll", "log_odds_ratio", *PAIR_KEYS)) and "eval_nll" in rows[-1]


def test_a_live_reference_on_a_trained_adapter_stops_at_start_up(tiny_model_dir, tmp_path, tiny_tokenizer):
    from lorafuse.job import train

    model = build_tiny_model(tokenizer=tiny_tokenizer)
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight)
    rows = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(8)]
    with pytest.raises(ConfigError, match="dpo_reference=live"):
        train(model, tiny_tokenizer, rows, output_dir=tmp_path / "run", format="preference", objective="dpo")


# --------------------------------------------------------------------------------------------- out of memory


def _pairs(tok, n_pairs=16):
    data = _cfg("unused", "unused").data.model_copy(update={"num_rows": n_pairs, "val_size": 0})
    return build_datasets(data, tok)[0]


def test_oom_resplit_keeps_a_pairs_rows_together(tiny_tokenizer):
    """A re-split preference batch's pieces are the smaller Batcher's micro-batches: rows [k:k'] with rows
    [B+k:B+k'], trimmed, with their pair count, data set rows and reference log-probs."""
    ds = _pairs(tiny_tokenizer)
    ds.ref_logps = np.arange(len(ds), dtype=np.float32) / 7
    common = dict(pad_id=tiny_tokenizer.pad_token_id, seed=3, pairs=True, pad_to_multiple_of=8)
    pieces = [p for b in Batcher(ds, 6, **common).epoch_batches(1) for p in split_batch(b, 2, 8)]
    expected = list(Batcher(ds, 2, **common).epoch_batches(1))
    assert len(pieces) == len(expected) == 8
    for got, want in zip(pieces, expected):
        assert got.keys() == want.keys() and got["num_pairs"] == 2
        for key, value in want.items():
            assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
    assert all(int(r) % 2 == 0 for p in pieces for r in p["rows"][:2])  # chosen rows first, then their rejected


def test_dpo_oom_mid_run_resplits_by_pairs_and_keeps_the_math(tiny_tokenizer):
    """An OOM at step 2 (4 pairs x 1): the step is retried as 2 pairs x 2 on the same pairs and every step's loss
    and margin is that of a run started at 2 x 2."""
    ds = _pairs(tiny_tokenizer)

    def loop(mb, ga, max_rows):
        torch.manual_seed(0)
        model = apply_lora(
            build_tiny_model(tokenizer=tiny_tokenizer), r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]
        )
        objective, calls = DPOObjective(), [0]
        real = objective.loss_sum

        def loss_sum(model, batch, ctx):
            calls[0] += 1
            if calls[0] > 1 and batch["input_ids"].shape[0] > max_rows:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(model, batch, ctx)

        objective.loss_sum = loss_sum
        tc = TrainConfig(
            max_steps=3, micro_batch_size=mb, grad_accum=ga, lr=5e-3, optimizer="adamw", gradient_checkpointing=False
        )
        batches = Batcher(ds, mb, tiny_tokenizer.pad_token_id, seed=1, pairs=True)
        return TrainingLoop(model, batches, tc, objective=objective, console=_console()[0]).run()

    direct, retried, half = loop(2, 2, 99), loop(4, 1, 4), loop(2, 1, 99)
    events = [r for r in retried.rows if r.get("event") == "oom_retry"]
    assert [(e["step"], e["micro_batch_size"], e["grad_accum"]) for e in events] == [(2, 2, 2)]
    keys = ("loss", "rewards/margin", "rewards/accuracy")
    got = [[r[k] for k in keys] for r in retried.rows if "loss" in r]
    want = [[r[k] for k in keys] for r in direct.rows if "loss" in r]
    # Step 1 ran one 4-pair batch where the direct run ran two 2-pair ones: the same math in another order of fp32
    # additions (~1e-7 relative), carried a few steps by the update; half the window would miss by far more.
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    halved = [[r[k] for k in keys] for r in half.rows if "loss" in r]
    assert not np.allclose(halved, want, rtol=1e-3)


@pytest.mark.slow
def test_the_examples_recipe_moves_held_out_pairs_toward_chosen(tmp_path, monkeypatch, capsys):
    """examples/tiny-dpo-cpu.yaml's three commands (the DPO run shorter): SFT on the tiny model, merge, DPO with a
    fresh adapter on the merged model. Held-out pairs (half asked in Japanese, half in English) move toward the chosen
    answers beyond what a language bias can reach (accuracy > 0.5), from margin 0 at the start (policy ==
    reference)."""
    from lorafuse.cli import main

    examples = Path(__file__).resolve().parents[2] / "examples"
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(examples / "tiny-cpu.yaml")]) == 0
    merge = ["merge", "--model", "builtin:tiny-llama", "--adapter", "runs/tiny-cpu/adapter"]
    assert main([*merge, "--out", "runs/tiny-cpu/merged", "--dtype", "float32"]) == 0
    assert main(["train", str(examples / "tiny-dpo-cpu.yaml"), "train.max_steps=40"]) == 0
    capsys.readouterr()
    rows = _rows(tmp_path / "runs" / "tiny-dpo-cpu")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert 0 < evals[0]["eval_rewards/margin"] < evals[1]["eval_rewards/margin"]
    assert evals[1]["eval_rewards/accuracy"] > 0.5 and evals[1]["eval_loss"] < np.log(2)

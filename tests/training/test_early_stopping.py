"""Early stopping: patience counts evaluations without an improvement of more than min_delta; the run's adapter is
the best evaluation's checkpoint; the same command again finds the run complete."""

from __future__ import annotations

import io
import json

from rich.console import Console
from safetensors.torch import load_file

from lorafuse.config import validate_config
from lorafuse.job import run


def _cfg(model_dir, out, **train):
    return validate_config(
        {
            "model": {"path": str(model_dir), "quant": "none", "compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "data": {"path": "builtin:demo", "format": "alpaca", "max_length": 64, "num_rows": 40, "val_size": 8},
            "train": {
                "max_steps": 40,
                "micro_batch_size": 4,
                "lr": 5e-3,
                "optimizer": "adamw",
                "gradient_checkpointing": False,
                "device": "cpu",
                "eval_every": 2,
                "save_every": 100,
                "early_stopping_patience": 2,
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


def _evals(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_min_delta_stops_once_improvements_are_small_and_the_adapter_is_the_best_checkpoints(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    buf = io.StringIO()
    # every eval after the first falls short of a 100-nat improvement: the run stops at the third evaluation
    result = run(_cfg(tiny_model_dir, out, early_stopping_min_delta=100.0), console=Console(file=buf, width=200))
    evals = _evals(out)
    assert result.stop_reason == "early_stopping" and result.steps == 6 and len(evals) == 3
    best_step = 2 * (1 + evals.index(min(evals)))
    assert (
        result.best_step == best_step and "early stopping: no eval loss more than 100 below the best" in buf.getvalue()
    )
    best = load_file(str(out / f"checkpoint-{best_step}" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert best.keys() == final.keys() and all((best[k] == final[k]).all() for k in best)
    summary = (out / "summary.json").read_text()
    again = run(_cfg(tiny_model_dir, out, early_stopping_min_delta=100.0), console=Console(file=io.StringIO()))
    assert again.stop_reason == "already_complete" and (out / "summary.json").read_text() == summary


def test_without_min_delta_any_improvement_restarts_the_patience(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = run(_cfg(tiny_model_dir, out, max_steps=8), console=Console(file=io.StringIO()))
    evals = _evals(out)
    assert all(b < a for a, b in zip(evals, evals[1:])), evals  # the loss falls at every evaluation here
    assert result.stop_reason == "finished" and result.steps == 8

"""End to end on a tiny random Llama: `lorafuse train`, SIGKILL after a checkpoint, the same command again.

The resumed run's per-step losses (and lr, grad norm, eval loss) must equal an uninterrupted run's bit for bit
on a CPU: LoRA dropout is on (RNG state matters), the kill lands mid-epoch (data position matters) and after a
metrics row newer than the checkpoint was written (the resume must drop it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("step", "loss", "lr", "grad_norm", "eval_loss", "skipped")


def _config(tmp_path: Path, model_dir: Path, out: Path) -> Path:
    cfg = {
        "model": {"path": str(model_dir), "quant": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
        "data": {"path": "builtin:demo", "format": "alpaca", "max_length": 96, "num_rows": 56, "val_size": 8},
        "train": {
            "max_steps": 8,
            "micro_batch_size": 4,
            "grad_accum": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "optimizer": "adamw_8bit",
            "gradient_checkpointing": True,
            "save_every": 3,
            "eval_every": 4,
            "device": "cpu",
            "seed": 7,
        },
        "output": {"dir": str(out)},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAFUSE_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }


def _rows(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r.get(k) for k in COMPARED) for r in rows]


# Runs `lorafuse train CFG` but parks the process right after the metrics row of step 5 (checkpoints 3 and 4
# are complete by then), so the test can SIGKILL it from outside at a known point.
_PARK_AFTER_STEP_5 = """
import sys, time
from lorafuse.training.metrics import MetricsLog
append = MetricsLog.append
def parking_append(self, row):
    append(self, row)
    if row.get("step") == 5 and "loss" in row:
        print("PARKED", flush=True)
        time.sleep(600)
MetricsLog.append = parking_append
from lorafuse.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_bitwise(tmp_path, tiny_model_dir):
    env = _env(tmp_path)
    full_out, cut_out = tmp_path / "full", tmp_path / "cut"
    full_cfg, cut_cfg = _config(tmp_path, tiny_model_dir, full_out), _config(tmp_path, tiny_model_dir, cut_out)
    lorafuse = [sys.executable, "-m", "lorafuse", "train"]

    victim = subprocess.Popen(
        [sys.executable, "-c", _PARK_AFTER_STEP_5, str(cut_cfg)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    full = subprocess.run(
        lorafuse + [str(full_cfg)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stdout + full.stderr
    deadline = time.time() + 300
    while (
        not (cut_out / "metrics.jsonl").is_file() or '"step": 5, "epoch"' not in (cut_out / "metrics.jsonl").read_text()
    ):
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read() if victim.poll() else "timeout"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert sorted(p.name for p in cut_out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not (cut_out / "adapter").exists()

    resumed = subprocess.run(
        lorafuse + [str(cut_cfg)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout

    expected = _rows(full_out)
    assert [r[0] for r in expected if r[1] is not None] == list(range(1, 9))
    assert _rows(cut_out) == expected  # floats compared exactly
    losses = [r[1] for r in expected if r[1] is not None]
    assert len(set(losses)) == len(losses)  # a real trajectory, not a constant
    for out in (full_out, cut_out):
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((out / "summary.json").read_text())["steps"] == 8
        assert (out / "loss.png").is_file() and (out / "config.yaml").is_file()
    full_adapter = (full_out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (cut_out / "adapter" / "adapter_model.safetensors").read_bytes() == full_adapter

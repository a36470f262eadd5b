"""Data parallelism on CPU (gloo): `torchrun --nproc_per_node 2 -m lorafuse train` against one process.

Claim under test: 2 ranks x micro-batch B x accumulation A compute the update of 1 rank with micro-batch B and
accumulation 2A over the same micro-batches (lorafuse.training.distributed). The data is chosen so that it shows:
19 training rows -> 10 micro-batches of 2 (the last holds 1 row), so sharding drops nothing; an epoch is 3 steps
(windows of 2+2+1 micro-batches per rank, 4+4+2 in one process) and step 4 begins the next epoch (a new order);
the micro-batches hold different numbers of target tokens, so normalising per rank instead of by the global
count changes the gradient; 7 validation rows -> 4 eval batches, 2 per rank, of unequal size.

The bounds. Both runs do the same fp32 work per micro-batch (same tensors, one thread each, so the same
kernels); only the order of the additions across micro-batches differs: one process adds K = 2A = 4 micro-batch
gradients into .grad one after another, two ranks add A each and the all-reduce adds the two partial sums.
Reordering a sum of K terms moves it by at most (K-1) u sum|g_i|, u = 2^-24 = 6e-8.
  * Losses, grad norms, eval losses: sums without cancellation (positive per-token losses; a norm dominated by
    its large elements), so <= (K-1) u = 1.8e-7 relative per step, and 4 steps of parameters that differ by
    the amount below add no more than that. We allow relative 1e-5 (measured: losses equal, grad norms
    <= 1.2e-7, eval losses <= 1.5e-8).
  * Adapter tensors: an AdamW step moves an element by lr * m/(sqrt(v) + eps), |m/sqrt(v)| <~ 1, and a relative
    gradient error e moves that ratio by <~ e. Per element e = (K-1) u k, where k = sum|g_i| / |sum g_i| is how
    much the element's gradient cancels across micro-batches, so the comparison is in units of lr * steps, not
    of |W| (lora_A's size is its random init). We allow |dW| <= 1e-4 lr steps, elements with k up to ~500
    (measured worst: 2.4e-6 lr steps, k ~ 13).
What the test catches is far larger: normalising by the per-rank instead of the global token count or a rank
that skips its shard moves the step-1 loss and grad norm by > 1e-3; summing vs averaging the gradients halves
the logged grad norm; unsynchronised ranks, a missing or an extra step move adapter elements by ~lr.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROWS = Path(__file__).parent / "data" / "ddp_rows.jsonl"  # Japanese/English instruction rows, of varied lengths
REL = 1e-5  # losses, grad norms, eval losses: relative (module docstring)
ADAPTER_LR_STEPS = 1e-4  # adapter elements: |dW| <= this * lr * steps (module docstring)

# Runs `python -m lorafuse ARGS` with an audit hook that records every write-like operation under OUT (argv[1])
# into AUDIT_DIR/audit-<RANK>.json (argv[2]); safetensors writes from Rust are covered by the folder renames.
_AUDITED = """
import atexit, json, os, runpy, sys
out, audit_dir = os.path.realpath(sys.argv[1]), sys.argv[2]
events = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        p = os.path.realpath(os.fsdecode(path))
        return p == out or p.startswith(out + os.sep)
    return False
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        if writes and inside(path):
            events.append([event, os.fsdecode(path)])
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.link",
                   "os.symlink") and any(inside(a) for a in args[:2]):
        events.append([event, os.fsdecode(args[0])])
def dump():
    with open(os.path.join(audit_dir, "audit-%s.json" % os.environ.get("RANK", "single")), "w") as f:
        json.dump(events, f)
atexit.register(dump)
sys.addaudithook(hook)
sys.argv = ["lorafuse"] + sys.argv[3:]
runpy.run_module("lorafuse", run_name="__main__", alter_sys=True)
"""


def _raw_config(model_dir: Path, out: Path, grad_accum: int, dropout: float = 0.0, max_steps: int = 4) -> dict:
    return {
        "model": {"path": str(model_dir), "quant": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": dropout, "targets": "all-linear"},
        "data": {"path": str(ROWS), "format": "alpaca", "max_length": 96, "num_rows": 26, "val_size": 7},
        "train": {
            "max_steps": max_steps,
            "micro_batch_size": 2,
            "grad_accum": grad_accum,
            "lr": 3e-3,
            "warmup_steps": 0,
            "scheduler": "constant",
            "optimizer": "adamw",
            "gradient_checkpointing": True,
            "save_every": 2,
            "eval_every": 2,
            "device": "cpu",
            "seed": 7,
        },
        "output": {"dir": str(out)},
    }


def _write(tmp_path: Path, raw: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(tmp_path: Path, cfg: Path, out: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    """2 ranks on gloo (--standalone picks a free port), torch on one thread per rank."""
    script = tmp_path / "audited_lorafuse.py"
    script.write_text(_AUDITED)
    audit = tmp_path / f"audit-{out.name}"
    audit.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAFUSE_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(out),
        str(audit),
        "train",
        str(cfg),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the one-thread ranks
    yield
    torch.set_num_threads(before)


def test_two_ranks_equal_one_process_with_double_accumulation(tmp_path, tiny_model_dir, one_thread):
    from rich.console import Console

    from lorafuse.config import validate_config
    from lorafuse.errors import LorafuseError
    from lorafuse.job import run

    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    stdout = _torchrun(tmp_path, _write(tmp_path, _raw_config(tiny_model_dir, ddp_out, 2), "ddp"), ddp_out).stdout
    console = Console(file=io.StringIO(), width=200)
    one = run(validate_config(_raw_config(tiny_model_dir, one_out, 4)), console=console)
    assert one.steps == 4 and one.stop_reason == "finished"

    ddp_rows, one_rows = _rows(ddp_out), _rows(one_out)
    assert [(r["step"], "loss" in r) for r in ddp_rows] == [(r["step"], "loss" in r) for r in one_rows]
    train = [(a, b) for a, b in zip(ddp_rows, one_rows) if "loss" in a]
    evals = [(a, b) for a, b in zip(ddp_rows, one_rows) if "eval_loss" in a]
    assert [a["step"] for a, _ in train] == [1, 2, 3, 4] and [a["step"] for a, _ in evals] == [2, 4]
    for a, b in train:
        assert a["tokens"] == b["tokens"] and a["epoch"] == b["epoch"]  # global token counts, same data position
        assert a["loss"] == pytest.approx(b["loss"], rel=REL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=REL)
    for a, b in evals:
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=REL)
    assert len({round(a["loss"], 6) for a, _ in train}) == 4  # a real trajectory

    ddp_w, one_w = _adapter(ddp_out), _adapter(one_out)
    assert set(ddp_w) == set(one_w)
    lr_steps = 3e-3 * 4
    for name, w in one_w.items():
        assert (ddp_w[name] - w).abs().max() <= ADAPTER_LR_STEPS * lr_steps, name
    trained = [w.abs().max() for name, w in one_w.items() if "lora_B" in name]
    assert min(trained) > 0.3 * lr_steps  # lora_B starts at zero: trained adapters are compared, not inits

    # Only rank 0 printed progress and wrote to the output folder (and it did write).
    assert stdout.count("step 1/4 |") == 1
    audit0 = json.loads((tmp_path / "audit-ddp" / "audit-0.json").read_text())
    audit1 = json.loads((tmp_path / "audit-ddp" / "audit-1.json").read_text())
    assert audit1 == []
    assert any(e == "os.rename" and "checkpoint-4.tmp-" in p for e, p in audit0)  # the checkpoint install
    assert any(e == "open" and p.endswith("metrics.jsonl") for e, p in audit0)
    assert not list(ddp_out.glob("checkpoint-*.tmp-*"))
    # save_every 2: checkpoints at steps 2 and 4 only, not also at the epoch end (step 3)
    assert sorted(p.name for p in ddp_out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    rng = torch.load(ddp_out / "checkpoint-4" / "rng.pt", weights_only=True)
    assert len(rng["per_rank"]) == 2 and not torch.equal(rng["per_rank"][0]["torch"], rng["per_rank"][1]["torch"])

    # A 2-process checkpoint does not resume in 1 process (its shards and RNG streams are per rank).
    with pytest.raises(LorafuseError, match=r"trained by 2 process\(es\).*this run has 1"):
        run(validate_config(_raw_config(tiny_model_dir, ddp_out, 2, max_steps=6)), console=console)


@pytest.mark.slow
def test_two_ranks_resume_bitwise_with_per_rank_dropout(tmp_path, tiny_model_dir):
    """Dropout on, so each rank's RNG stream matters: resuming a 2-rank run from its step-2 checkpoint (in a
    fresh folder) gives the uninterrupted run's rows and adapter bit for bit. Then a user error found by rank 0
    (a changed config) stops both ranks (rank 0 prints the error once), not with a hang."""
    full_out, resumed_out = tmp_path / "full", tmp_path / "resumed"
    _torchrun(tmp_path, _write(tmp_path, _raw_config(tiny_model_dir, full_out, 2, dropout=0.2), "full"), full_out)
    cfg = _write(tmp_path, _raw_config(tiny_model_dir, resumed_out, 2, dropout=0.2), "resumed")
    stdout = _torchrun(tmp_path, cfg, resumed_out, "--resume", str(full_out / "checkpoint-2")).stdout
    assert "resuming from" in stdout
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss", "tokens")
    expected = [tuple(r.get(k) for k in keys) for r in _rows(full_out)]
    assert [tuple(r.get(k) for k in keys) for r in _rows(resumed_out)] == expected  # floats compared exactly
    full_bytes = (full_out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (resumed_out / "adapter" / "adapter_model.safetensors").read_bytes() == full_bytes

    changed = _raw_config(tiny_model_dir, resumed_out, 2, dropout=0.2)
    changed["train"]["lr"] = 1e-3
    failed = _torchrun(tmp_path, _write(tmp_path, changed, "changed"), resumed_out, ok=False)
    # both ranks stop (the run returns instead of hanging); the message is printed once, by rank 0
    assert failed.returncode != 0
    assert failed.stderr.count("error: the config differs from the one checkpoint-4 was trained with") == 1

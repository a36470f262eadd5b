"""lorafuse job runner: the `lorafuse train` job itself (lorafuse.job.run) on the step the harness times, for
`lorafuse bench --job`: its row stands beside the harness row of lorafuse_stack.py.

In a temporary folder it writes a JSONL file of raw-text rows (random words of the checkpoint folder's tokenizer,
exactly --seq tokens each: every micro-batch is batch x seq real tokens, one sequence a row, no padding and so no
attention mask, as the harness's rows) and a config of the harness's
step: model.path the checkpoint folder, quant nf4 (qlora) or none (lora), the compute dtype, LoRA r / alpha /
dropout on the 7 projections, data.format text with max_length seq, micro_batch_size batch, grad_accum 1, the
optimizer, checkpointing, and lorafuse's settings (fast path, CUDA graphs, offload, host tables, kept layers,
dequant cap, FP8) as their train.* keys; max_steps warmup + steps, log_every 1, no evaluation, one checkpoint (the
last step's). lorafuse.job.run trains it with its console in a buffer (copied to stderr afterwards).

What ran (the fast path, the fused loss, CUDA graph replays) comes from the job's result (`TrainResult.speedups`,
also in summary.json). The step times come from metrics.jsonl (log_every 1: a row a step). The loop does not wait for
the GPU inside a step: it reads a step's numbers one step later, and times each step by when the device finished it
(lorafuse.training.loop). The row's step time is the time between two rows (its tokens over its tokens_per_s), which
is what a user waits; beside it, loop_step_s comes from time_s, the loop's running total of training time (its steps
and their logging, not evaluation or checkpoints), so step k took time_s[k] - time_s[k-1]. The two differ only
around a checkpoint or an evaluation. The first --warmup steps are dropped and the median of the rest is the step
time, as the harness's. Peak memory: torch.cuda.max_memory_allocated over the whole
process (loading included; the harness's counts from after the model is built), and the largest memory_mb of the
rows (on a CPU: the resident set size).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from bench_common import GIB, PROJ7, report, require


def job_config(spec: dict, data: Path, out: Path):
    """The RunConfig of the harness's step (module docstring)."""
    from lorafuse.config import validate_config

    max_steps = spec["warmup"] + spec["steps"]
    raw = {
        "model": {
            "path": spec["folder"],
            "quant": "nf4" if spec["method"] == "qlora" else "none",
            "compute_dtype": spec["dtype"],
        },
        "lora": {
            "r": spec["r"],
            "alpha": spec["alpha"],
            "dropout": spec["dropout"],
            "targets": PROJ7,
            "train_untrained_tokens": "off",
        },
        "data": {"path": str(data), "format": "text", "max_length": spec["seq"], "packing": False, "val_size": 0},
        "train": {
            **_train_settings(spec),
            "max_steps": max_steps,
            "micro_batch_size": spec["batch"],
            "grad_accum": 1,
            "lr": 2e-4,
            "weight_decay": 0.0,
            "warmup_steps": 0,
            "scheduler": "constant",
            "max_grad_norm": 1.0,
            "optimizer": spec["optimizer"],
            "log_every": 1,
            "save_every": max_steps,
            "save_total_limit": 1,
            "seed": spec["seed"],
            "device": spec["device"],
        },
        "output": {"dir": str(out)},
    }
    return validate_config(raw, source="lorafuse bench --job")


def _train_settings(spec: dict) -> dict:
    """lorafuse's own settings as train.* keys: the same Options lorafuse_stack._options builds from the spec."""
    return {
        "fast_path": spec.get("fast_path", "auto"),
        "cuda_graphs": "auto" if spec.get("cuda_graphs", True) else "off",
        "gradient_checkpointing": spec["gc"],
        "uncheckpointed_layers": spec.get("uncheckpointed_layers") or 0,
        "embeddings_on_host": bool(spec.get("embeddings_on_host")),
        "head_on_host": bool(spec.get("head_on_host")),
        "dequant_cap_mib": spec.get("dequant_cap_mib") or 0,
        "fp8": bool(spec.get("fp8")),
    }


def write_rows(spec: dict, path: Path) -> Path:
    """(warmup + steps) x batch rows of random words from the tokenizer's vocabulary, seeded, each exactly seq tokens
    as the job tokenizes raw text (the tokenizer's prefix, the text, EOS): words that are one token each with their
    leading space, as many as leave room for the prefix and EOS. (The job refuses data whose every row is longer
    than max_length, so the rows cannot simply be cut to it.)"""
    from lorafuse.model.load import load_tokenizer

    tokenizer = load_tokenizer(spec["folder"])
    words = _one_token_words(tokenizer)
    room = spec["seq"] - len(tokenizer("")["input_ids"]) - 1
    rng = random.Random(spec["seed"])
    texts = ["".join(rng.choices(words, k=room)) for _ in range((spec["warmup"] + spec["steps"]) * spec["batch"])]
    lengths = {len(tokenizer(t)["input_ids"]) + 1 for t in texts}
    if lengths != {spec["seq"]}:
        raise RuntimeError(f"rows of {sorted(lengths)} tokens from this tokenizer, not {spec['seq']}")
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _one_token_words(tokenizer) -> list[str]:
    """The vocabulary's words that start with a space and encode back to their one token."""
    special = set(tokenizer.all_special_ids)
    words = []
    for i in range(len(tokenizer)):
        word = tokenizer.decode([i])
        if i not in special and word.startswith(" ") and word.strip():
            if tokenizer.encode(word, add_special_tokens=False) == [i]:
                words.append(word)
    if not words:
        raise RuntimeError("the tokenizer has no one-token words with a leading space to make the rows from")
    return words


def _what_ran(spec: dict, done, notes: list[str]) -> dict:
    """The row's fast_path, cuda_graphs, loss kind and trainable params, from the job's result (`speedups`: what its
    loop ran) and its console notes."""
    ran = done.speedups
    if ran.get("fast_path"):
        fast = {"applied": True, "reason": "fast path on"}
    else:
        off = "train.fast_path is off" if spec.get("fast_path") == "off" else f"the model is on {spec['device']}"
        fast = {"applied": False, "reason": next((n for n in notes if n.startswith("fast path off")), off)}
    said = next((n for n in reversed(notes) if "CUDA graphs" in n), "")
    replays = ran.get("cuda_graph_replays", 0)
    graphs = {"applied": replays > 0, "reason": said or "off (the loop runs eagerly here)", "replays": replays}
    counted = next((n for n in notes if n.startswith("trainable params:")), "")
    trainable = int(counted.split("||")[0].split(":")[1].replace(",", "")) if counted else None
    return {
        "fast_path": fast,
        "cuda_graphs": graphs,
        "fused_loss": bool(ran.get("fused_loss")),
        "trainable_params": trainable,
    }


def step_times(rows: list[dict]) -> list[float]:
    """Each step's seconds from the train rows' running time_s (a skipped step logs no time: the steps between two
    timed rows share their time)."""
    times, step, total = [], 0, 0.0
    for row in rows:
        if row.get("time_s") is None or row.get("loss") is None:
            continue
        n = row["step"] - step
        times += [round((row["time_s"] - total) / n, 6)] * n
        step, total = row["step"], row["time_s"]
    return times


def summarize(spec: dict, rows: list[dict]) -> dict:
    """The harness's fields from metrics.jsonl: median step after warmup, tokens/s, losses, the rows' memory.

    step_s is the time a user waits per step: each row's tokens over its tokens_per_s (with log_every 1 a row is one
    step, timed from the end of the previous one: checkpoints and evaluations between them included). loop_step_s is
    the training time alone (time_s differences, `step_times`)."""
    train = [r for r in rows if r.get("time_s") is not None and r.get("loss") is not None]
    times = step_times(rows)[spec["warmup"] :]
    tokens = spec["batch"] * spec["seq"]
    walls = [tokens / r["tokens_per_s"] for r in train[spec["warmup"] :] if r.get("tokens_per_s")]
    step_s = statistics.median(walls) if len(walls) == len(times) else statistics.median(times)
    result = {
        "status": "ok",
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "loop_step_s": statistics.median(times),
        "step_times": walls if len(walls) == len(times) else times,
        "loop_step_times": times,
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "metrics_memory_mb": max(r.get("memory_mb") or 0.0 for r in train),
    }
    return {**result, **_checked(spec, rows, len(times))}


def _checked(spec: dict, rows: list[dict], timed: int) -> dict:
    """{} when the job ran the harness's step, else the status and reason that say how it did not."""
    retry = next((r for r in rows if r.get("event") == "oom_retry"), None)
    if retry is not None:
        return {"status": "oom", "reason": f"the job ran out of memory at step {retry['step']} and went on smaller"}
    want = (spec["warmup"] + spec["steps"]) * spec["batch"] * spec["seq"]
    tokens = max((r.get("tokens") or 0 for r in rows), default=0)
    if tokens != want or timed != spec["steps"]:
        why = f"{tokens} tokens in {timed} timed steps, not {want} in {spec['steps']}"
        return {"status": "error", "reason": f"the job's steps were not the harness's: {why}"}
    return {}


def run_job(spec: dict, device, info: dict) -> dict:
    """Train the job in a temporary folder and return its row's fields (`info`: what the loop prepared)."""
    require("lorafuse.job")
    import torch

    with tempfile.TemporaryDirectory(prefix="lorafuse-bench-job-") as tmp:
        cfg = job_config(spec, write_rows(spec, Path(tmp) / "rows.jsonl"), Path(tmp) / "run")
        done, log = _quiet_job(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    notes = _notes(log)
    info.update(_what_ran(spec, done, notes), notes=notes)
    cuda = device.type == "cuda"
    return {
        **summarize(spec, rows),
        "job_wall_s": done.wall_s,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
    }


def _quiet_job(cfg):
    """(TrainResult, console text) of lorafuse.job.run with its console and prints in a buffer, copied to stderr
    (the harness shows a runner's stderr when it fails; its stdout carries the result line)."""
    from lorafuse import job
    from lorafuse.console import make_console

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            done = job.run(cfg, resume=None, console=make_console(file=buffer, width=160))
    finally:
        sys.stderr.write(buffer.getvalue())
    return done, buffer.getvalue()


def _notes(log: str) -> list[str]:
    """The job's console lines before its summary, without the per-step progress lines."""
    lines = log.split("lorafuse run summary")[0].splitlines()
    return [x for x in lines if x.strip() and not x.startswith("step ")]


if __name__ == "__main__":
    report(run_job)

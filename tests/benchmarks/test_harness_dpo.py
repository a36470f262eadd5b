"""`lorafuse bench --objective dpo`: DPO steps of lorafuse and TRL's DPOTrainer through the harness on a CPU, and the
arguments and rows that make a DPO run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]
import bench  # noqa: E402  (the harness lives in benchmarks/, beside its runners)
import bench_table  # noqa: E402
from bench_common import make_pair_batches  # noqa: E402

from lorafuse.errors import LorafuseError  # noqa: E402

LN2 = math.log(2)
PAIRS, SEQ = 2, 32


@pytest.fixture(scope="module")
def dpo_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-dpo-out")
    memory_log = out / "measured.jsonl"
    argv = ["--shape", "tiny", "--device", "cpu", "--objective", "dpo", "--pairs", str(PAIRS), "--seq", str(SEQ)]
    argv += ["--steps", "2", "--warmup", "1", "--stacks", "lorafuse,hf,unsloth", "--methods", "qlora,lora"]
    argv += ["--out", str(out), "--memory-log", str(memory_log), "--timeout", "600"]
    argv += ["--model-dir", str(tmp_path_factory.mktemp("bench-dpo-models"))]
    rc = bench.main(argv)
    rows = [json.loads(line) for f in out.glob("*-cpu.jsonl") for line in f.read_text().splitlines()]
    return rc, rows, memory_log


@pytest.mark.slow
def test_dpo_rows_of_lorafuse_and_trl(dpo_rows):
    """Each stack's first step runs with B = 0, where the policy is its reference bit for bit: the DPO loss of every
    pair is -log sigmoid(0) = ln 2, so the mean over the pairs is ln 2 up to fp32 rounding."""
    rc, rows, memory_log = dpo_rows
    assert rc == 0 and len(rows) == 6
    by = {(r["stack"], r["method"]): r for r in rows}
    for row in rows:
        assert (row["objective"], row["pairs"], row["batch"], row["seq"]) == ("dpo", PAIRS, 2 * PAIRS, SEQ)
        assert row["prompt_tokens"] == SEQ // 4 and not [k for k in bench.REQUIRED_KEYS if k not in row]
    for key in [("hf", "qlora"), ("unsloth", "qlora"), ("unsloth", "lora")]:
        assert by[key]["status"] == "unavailable" and "CUDA" in by[key]["reason"]
    for key in [("lorafuse", "qlora"), ("lorafuse", "lora"), ("hf", "lora")]:
        r = by[key]
        assert r["status"] == "ok", (key, r.get("reason"))
        assert abs(r["loss_first"] - LN2) < 1e-6, (key, r["loss_first"])
        assert math.isfinite(r["loss_last"]) and len(r["step_times"]) == 2 and r["step_s"] > 0
        assert r["pairs_per_s"] == pytest.approx(PAIRS / r["step_s"])
        assert r["tokens_per_s"] == pytest.approx(2 * PAIRS * SEQ / r["step_s"])
    ours, trl = by["lorafuse", "lora"], by["hf", "lora"]
    assert ours["trainable_params"] == trl["trainable_params"] == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)
    assert ours["reference"].startswith("live") and ours["cuda_graphs"]["applied"] is False
    assert "predicted_peak_alloc_gib" not in ours  # the planner models SFT steps
    assert trl["trainer"].endswith("DPOTrainer") and trl["trl"] and trl["loss_type"] == ["sigmoid"]
    assert trl["reference"] == "this model with the adapter disabled" and trl["beta"] == 0.1
    assert not memory_log.exists()


def test_pair_batches_share_each_prompt_and_train_the_responses():
    spec = {"seed": 0, "pairs": 3, "seq": 16, "prompt_tokens": 4, "vocab_size": 512}
    (batch,) = make_pair_batches(spec, "cpu", 1)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (6, 16) and batch["num_pairs"] == 3
    assert bool((ids[:3, :4] == ids[3:, :4]).all()) and not bool((ids[:3, 4:] == ids[3:, 4:]).all())
    assert bool((labels[:, :4] == -100).all()) and bool((labels[:, 4:] == ids[:, 4:]).all())
    assert bool(batch["attention_mask"].all())


def test_dpo_arguments():
    args = bench.parse_args(["--objective", "dpo", "--seq", "512"])
    assert (args.pairs, args.batch) == (4, 8)
    spec = bench._spec(args, "hf", "qlora", "folder")
    assert (spec["objective"], spec["pairs"], spec["batch"], spec["prompt_tokens"]) == ("dpo", 4, 8, 128)
    sft = bench.parse_args([])
    assert (sft.objective, sft.pairs, sft.batch) == ("sft", None, 4)
    assert bench._row(sft, "r", "hf", "qlora", {}, {}, ("c", None))["objective"] == "sft"
    for argv, said in [
        (["--pairs", "2"], "--objective dpo"),
        (["--objective", "dpo", "--batch", "8"], "--pairs"),
        (["--objective", "dpo", "--table"], "--table"),
        (["--objective", "dpo", "--seq", "1"], "--seq"),
        (["--objective", "dpo", "--pairs", "0"], "--pairs"),
    ]:
        with pytest.raises(LorafuseError) as err:
            bench.parse_args(argv)
        assert said in err.value.problem + (err.value.fix or ""), argv
    assert bench._precheck(args, "hf", "full", {}).startswith("unavailable: the DPO benchmark trains adapters")


def test_dpo_table_compares_pairs_per_second():
    def row(stack, step, peak):
        return {
            "stack": stack,
            "method": "qlora",
            "objective": "dpo",
            "status": "ok",
            "step_s": step,
            "pairs_per_s": 4 / step,
            "tokens_per_s": 4096 / step,
            "peak_alloc_gib": peak,
            "device": "cpu",
            "reason": None,
        }

    text = bench_table.render([row("lorafuse", 0.5, 6.0), row("hf", 1.25, 8.0)])
    assert "pairs/s" in text.splitlines()[0] and "    8.00 " in text
    assert "ratios (pairs/s" in text and "qlora: lorafuse vs hf: speed 2.50x, memory 0.75x" in text


def test_unsloth_rows_record_unsloths_switches(monkeypatch):
    monkeypatch.setenv("UNSLOTH_FUSED_PREFERENCE_LOSS", "1")
    args = bench.parse_args(["--objective", "dpo"])
    unsloth, hf = (bench._row(args, "r", stack, "qlora", {}, {}, ("c", None)) for stack in ("unsloth", "hf"))
    assert unsloth["env"]["UNSLOTH_FUSED_PREFERENCE_LOSS"] == "1"
    assert "UNSLOTH_FUSED_PREFERENCE_LOSS" not in hf.get("env", {})

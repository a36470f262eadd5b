"""Predictions against measured GPU peaks (issue C item 2: within 10%), from benchmarks/measured_memory.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafuse.plan.measured import MEASURED_FILE, read_measured, workload_from_record, workload_to_record
from lorafuse.plan.memory import GIB, Workload, estimate
from lorafuse.plan.shapes import load_shape

ROOT = Path(__file__).resolve().parents[2]


def test_predictions_within_10_percent_of_measurements(monkeypatch):
    rows = read_measured(ROOT / MEASURED_FILE)
    if not rows:
        pytest.skip(f"{MEASURED_FILE} holds no GPU measurements yet: run `lorafuse bench` on a GPU (it appends "
                    "one row per lorafuse run) and commit the file")
    misses = []
    for row in rows:
        with monkeypatch.context() as env:  # the A/B switches the run was made with (the planner reads them too)
            for key, value in (row.get("env") or {}).items():
                env.setenv(key, value)
            predicted = estimate(workload_from_record(row["workload"])).peak_alloc / GIB
        measured = row["measured_peak_alloc_gib"]
        if abs(predicted - measured) > 0.10 * measured:
            misses.append(f"{row['workload']['shape']} {row['workload']['method']} mb={row['workload']['micro_batch']} "
                          f"seq={row['workload']['seq']} ck={row['workload']['checkpointing']} on {row.get('card')}: "
                          f"predicted {predicted:.2f} GiB, measured {measured:.2f} GiB")
    assert not misses, "\n".join(misses)


def test_record_round_trip():
    w = Workload(load_shape("llama3-8b"), method="lora", micro_batch=2, seq=1024, targets=("q_proj", "v_proj"),
                 checkpointing="off", kernels="fused")
    back = workload_from_record(workload_to_record(w))
    assert back == w and estimate(back).peak == estimate(w).peak
    with pytest.raises(ValueError, match="unknown workload keys"):
        workload_from_record({**workload_to_record(w), "batch": 4})


def test_step_time_model_against_the_calibration_runs():
    """The speed model has one fitted constant for the fused path (speed.EFFICIENCY_FUSED, from the H200 runs in
    speed.CALIBRATION_RUNS); its shape (kept layers, sequence length, offload, dropout) must hold across all six:
    each predicted step within 5% of the measured median."""
    import json

    from lorafuse.plan import speed

    steps = {}
    for path in (ROOT / "benchmarks" / "results").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("run") in speed.CALIBRATION_RUNS and row.get("stack") == "lorafuse":
                steps[row["run"]] = (row["step_s"], row["card"])
    records = {r["run"]: r for r in read_measured(ROOT / MEASURED_FILE) if r.get("run") in speed.CALIBRATION_RUNS}
    assert set(steps) == set(records) == set(speed.CALIBRATION_RUNS)
    misses = []
    for run, (measured, card) in steps.items():
        w = workload_from_record(records[run]["workload"])
        predicted = speed.step_seconds(w, speed.card_by_name(card))
        if abs(predicted - measured) > 0.05 * measured:
            misses.append(f"{run}: predicted {predicted:.4f} s, measured {measured:.4f} s")
    assert not misses, "\n".join(misses)


def test_fp8_step_times_against_the_measured_runs(monkeypatch):
    """speed.FP8_SPEEDUP is fitted on one pair of runs (speed.FP8_CALIBRATION), FAST_ACCUM_SPEEDUP on another;
    every other FP8 run (offload, both tables on the host, a dequantization cap, LoRA on a bf16 base, 1 x 4096,
    8 x 2048) must be predicted within 5% under the switches it ran with (its record's env; the runs before the
    fast-accumulation switch existed carry its off value), and each calibration pair's ratio within 3%. Runs with
    the FP8 backward switch on (LORAFUSE_FP8_BACKWARD=1, an A/B experiment the planner does not price) are left out."""
    import json

    from lorafuse.plan import speed

    rows = {}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*-h200.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if (row.get("stack") == "lorafuse" and row.get("status") == "ok"
                    and (row.get("fp8") or row["run"] in speed.FP8_CALIBRATION)
                    and (row.get("env") or {}).get("LORAFUSE_FP8_BACKWARD", "0") != "1"):
                rows[row["run"]] = row
    records = {r["run"]: r for r in read_measured(ROOT / MEASURED_FILE) if r.get("run") in rows}
    assert len(records) == len(rows) >= 9
    predicted = {}
    for run in rows:
        with monkeypatch.context() as env:
            for key, value in (records[run].get("env") or {}).items():
                env.setenv(key, value)
            predicted[run] = speed.step_seconds(workload_from_record(records[run]["workload"]),
                                                speed.card_by_name(rows[run]["card"]))
    from lorafuse.kernels.fp8 import FAST_ACCUM_MAX_K_DEFAULT

    assert speed.FP8_FAST_ACCUM_MAX_K == FAST_ACCUM_MAX_K_DEFAULT, "the planner mirrors the kernels' default"
    bf16, fp8 = speed.FP8_CALIBRATION
    assert records[fp8]["workload"]["fp8"] and not records[bf16]["workload"].get("fp8")
    for slow, fast in (speed.FP8_CALIBRATION, speed.FAST_ACCUM_CALIBRATION):
        ratio_measured = rows[fast]["step_s"] / rows[slow]["step_s"]
        assert abs(predicted[fast] / predicted[slow] / ratio_measured - 1) < 0.03
    misses = [f"{run}: predicted {predicted[run]:.4f} s, measured {rows[run]['step_s']:.4f} s" for run in rows
              if abs(predicted[run] / rows[run]["step_s"] - 1) > 0.05]
    assert not misses, "\n".join(misses)

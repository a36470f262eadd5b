"""Predictions against measured GPU peaks (within 10%), from benchmarks/measured_memory.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafuse.plan.measured import MEASURED_FILE, read_measured, workload_from_record, workload_to_record
from lorafuse.plan.memory import GIB, estimate
from lorafuse.plan.shapes import load_shape
from lorafuse.plan.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = json.loads((ROOT / "benchmarks" / "calibration.json").read_text(encoding="utf-8"))["constants"]
CALIBRATION_RUNS = CALIBRATION["EFFICIENCY_FUSED"]["runs"]  # the six runs speed.EFFICIENCY_FUSED is fitted on
# The environment switches some runs were made with. LORAFUSE_DEQUANT_CAP_MIB is train.dequant_cap_mib now (the same
# code); the others selected code paths that were deleted once their A/B was decided (the host head staged whole,
# FP8 with a bf16 backward, FP8 without fast accumulation): those runs measured code that no longer exists.
DELETED_PATHS = {("LORAFUSE_HEAD_STREAM", "0"), ("LORAFUSE_FP8_BACKWARD", "0"), ("LORAFUSE_FP8_FAST_ACCUM_MAX_K", "0")}


def current_workload(row: dict) -> Workload | None:
    """The workload a measured row ran, as today's planner expresses it; None for a row of a deleted code path."""
    env = row.get("env") or {}
    if DELETED_PATHS & set(env.items()):
        return None
    w = workload_from_record(row["workload"])
    if "LORAFUSE_DEQUANT_CAP_MIB" in env:
        w = w.with_(dequant_cap_mib=int(env["LORAFUSE_DEQUANT_CAP_MIB"]))
    return w


def test_calibration_names_speed_constants_and_recorded_runs():
    """Every constant benchmarks/calibration.json names is one of plan/speed.py's, and every run it names has a bench
    row and a measured-memory record (the step time and the workload the calibration tests read)."""
    from lorafuse.plan import speed

    runs = set()
    for name, entry in CALIBRATION.items():
        assert isinstance(getattr(speed, name, None), float), f"{name} is not a constant of lorafuse.plan.speed"
        runs |= set(entry.get("runs", [])) | {
            run for pair in entry.get("pairs", []) for run in (pair["off"], pair["on"])
        }
    rows = {
        json.loads(line).get("run")
        for path in (ROOT / "benchmarks" / "results").glob("*.jsonl")
        for line in path.read_text().splitlines()
    }
    records = {r["run"] for r in read_measured(ROOT / MEASURED_FILE)}
    assert runs and runs <= rows and runs <= records, sorted(runs - (rows & records))


def test_predictions_within_10_percent_of_measurements():
    rows = read_measured(ROOT / MEASURED_FILE)
    if not rows:
        pytest.skip(
            f"{MEASURED_FILE} holds no GPU measurements yet: run `lorafuse bench` on a GPU (it appends "
            "one row per lorafuse run) and commit the file"
        )
    misses = []
    current = [(row, w) for row in rows if (w := current_workload(row)) is not None]
    assert len(current) >= 0.8 * len(rows)
    for row, w in current:
        predicted = estimate(w).peak_alloc / GIB
        measured = row["measured_peak_alloc_gib"]
        if abs(predicted - measured) > 0.10 * measured:
            misses.append(
                f"{row['workload']['shape']} {row['workload']['method']} mb={row['workload']['micro_batch']} "
                f"seq={row['workload']['seq']} ck={row['workload']['checkpointing']} on {row.get('card')}: "
                f"predicted {predicted:.2f} GiB, measured {measured:.2f} GiB"
            )
    assert not misses, "\n".join(misses)


def test_record_round_trip():
    w = Workload(
        load_shape("llama3-8b"),
        method="lora",
        micro_batch=2,
        seq=1024,
        targets=("q_proj", "v_proj"),
        checkpointing="off",
        kernels="fused",
    )
    back = workload_from_record(workload_to_record(w))
    assert back == w and estimate(back).peak == estimate(w).peak
    with pytest.raises(ValueError, match="unknown workload keys"):
        workload_from_record({**workload_to_record(w), "batch": 4})


def test_step_time_model_against_the_calibration_runs():
    """The speed model has one fitted constant for the fused path (speed.EFFICIENCY_FUSED, from the H200 runs that
    benchmarks/calibration.json names); its shape (kept layers, sequence length, offload, dropout) must hold across
    all six: each predicted step within 5% of the measured median."""
    from lorafuse.plan import speed

    steps = {}
    for path in (ROOT / "benchmarks" / "results").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("run") in CALIBRATION_RUNS and row.get("stack") == "lorafuse":
                steps[row["run"]] = (row["step_s"], row["card"])
    records = {r["run"]: r for r in read_measured(ROOT / MEASURED_FILE) if r.get("run") in CALIBRATION_RUNS}
    assert set(steps) == set(records) == set(CALIBRATION_RUNS)
    misses = []
    for run, (measured, card) in steps.items():
        w = workload_from_record(records[run]["workload"])
        predicted = speed.step_seconds(w, speed.card_by_name(card))
        if abs(predicted - measured) > 0.05 * measured:
            misses.append(f"{run}: predicted {predicted:.4f} s, measured {measured:.4f} s")
    assert not misses, "\n".join(misses)


REPLACED_KERNEL_RUNS = {  # the FP8 backward with a transposed NF4 decode since replaced (21% slower step)
    "20261129T003257-6fa6fa",
    "20261129T003352-c489ed",
}


def test_fp8_step_times_against_the_measured_runs():
    """speed.FP8_SPEEDUP, FAST_ACCUM_SPEEDUP and FP8_BACKWARD_SPEEDUP were fitted on A/B runs made on one machine
    (benchmarks/calibration.json). The runs of today's FP8 path (forward, recompute and, for NF4, the backward's dX
    in e4m3, fast accumulation at K <= 4096) at the shapes the step model is calibrated on (CALIBRATION_RUNS:
    4 x 512 and 1 x 4096 tokens) must each be predicted within 5%. 8 x 2048 is left out: the bf16 model itself is
    not calibrated there (its 8 x 2048 runs are predicted 3-15% fast)."""
    from lorafuse.plan import speed

    rows = {}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*-h200.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("stack") == "lorafuse" and row.get("status") == "ok" and row.get("fp8"):
                if row["run"] in REPLACED_KERNEL_RUNS:
                    continue
                rows[row["run"]] = row
    records = {r["run"]: r for r in read_measured(ROOT / MEASURED_FILE) if r.get("run") in rows}
    workloads = {run: w for run, r in records.items() if (w := current_workload(r)) is not None}
    calibrated = {run for run in workloads if (rows[run]["batch"], rows[run]["seq"]) in {(4, 512), (1, 4096)}}
    assert {(rows[r]["batch"], rows[r]["seq"]) for r in calibrated} == {(4, 512), (1, 4096)}
    misses = []
    for run in calibrated:
        predicted = speed.step_seconds(workloads[run], speed.card_by_name(rows[run]["card"]))
        if abs(predicted / rows[run]["step_s"] - 1) > 0.05:
            misses.append(f"{run}: predicted {predicted:.4f} s, measured {rows[run]['step_s']:.4f} s")
    assert not misses, "\n".join(misses)

"""Measured peaks to hold the planner to: benchmarks/measured_memory.jsonl, one JSON object per line.

    {"date": "2026-11-28", "card": "NVIDIA H100 80GB HBM3", "commit": "2dd9183...", "torch": "2.9.0",
     "run": "20261128T101500-ab12cd", "stack": "lorafuse",
     "workload": {"shape": "llama2-7b", "method": "qlora", "micro_batch": 4, "seq": 512, "grad_accum": 1,
                  "r": 16, "targets": ["q_proj", ...], "dropout": 0.0, "optimizer": "paged_adamw_8bit",
                  "checkpointing": "on", "loss": "chunked", "kernels": "reference", "padded": false,
                  "compute_bytes": 2, "lora_bytes": 4, "autocast": true, ...},
     "measured_peak_alloc_gib": 5.91, "measured_peak_reserved_gib": 6.30, "predicted_peak_alloc_gib": 5.84}

`workload` holds the fields of `lorafuse.plan.workload.Workload` (`shape`: a built-in shape name, hub id or
config.json path that `load_shape` resolves). `measured_peak_alloc_gib` is torch.cuda.max_memory_allocated
over the timed training steps (reset after the model is loaded), in GiB. `lorafuse bench` appends a row
for every lorafuse run on a GPU; tests/plan/test_measured.py checks each prediction is within 10%.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lorafuse.plan.shapes import load_shape
from lorafuse.plan.workload import Workload

MEASURED_FILE = "benchmarks/measured_memory.jsonl"


def workload_to_record(w: Workload, shape_id: str | None = None) -> dict:
    record = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "shape"}
    record["targets"] = list(record["targets"])
    record["modules_to_save"] = list(record["modules_to_save"])
    return {"shape": shape_id or w.shape.name, **record}


def workload_from_record(record: dict) -> Workload:
    fields = {f.name for f in dataclasses.fields(Workload)} - {"shape"}
    unknown = set(record) - fields - {"shape"}
    if unknown:
        raise ValueError(f"unknown workload keys {sorted(unknown)}; known: {sorted(fields)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k != "shape"}
    return Workload(shape=load_shape(record["shape"]), **kw)


def read_measured(path: str | Path) -> list[dict]:
    """Rows of a measured-memory file (blank lines and lines starting with # are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: not JSON ({exc})") from None
    return rows

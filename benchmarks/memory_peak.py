"""What is alive at a lorafuse training step's memory peak: for explaining a planner miss (issue C).

    python benchmarks/memory_peak.py --shape qwen2.5-1.5b --method qlora --batch 2 --seq 2048 [--out DIR]

Builds the model as `lorafuse bench --random-init` does (benchmarks/peers/lorafuse_stack.py), runs 2 warm-up
steps, then records the CUDA allocator's history over 2 more steps. Replaying the recorded allocations gives
the peak and the tensors alive at it, grouped by the innermost lorafuse / transformers / torch source line
that allocated them. The planner's components for the same workload are printed beside it. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "peers")]

GIB = 1024 ** 3


def _where(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if "/lorafuse/" in name or "/transformers/" in name or "benchmarks/" in name:
            return f"{name.split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename', '?').split('/')[-1]}:{frames[0].get('line')}" if frames else "?"


def alive_at_peak(trace: list[dict]) -> tuple[int, dict]:
    """(peak bytes above the start, {source line: bytes}) from one device's allocator trace."""
    cur = peak = peak_i = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            cur += ev["size"]
        elif ev["action"] == "free_completed":
            cur -= ev["size"]
        if cur > peak:
            peak, peak_i = cur, i
    alive: dict[int, dict] = {}
    for ev in trace[:peak_i + 1]:
        if ev["action"] == "alloc":
            alive[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            alive.pop(ev["addr"], None)
    groups: dict[str, int] = defaultdict(int)
    for ev in alive.values():
        groups[_where(ev.get("frames", []))] += ev["size"]
    return peak, dict(groups)


def main(argv=None) -> int:
    import torch

    import lorafuse_stack
    from bench_common import make_batches
    from lorafuse.bench import _workload, parse_args
    from lorafuse.plan.memory import estimate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--method", default="qlora", choices=("qlora", "lora"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    args = parse_args(["--shape", a.shape, "--batch", str(a.batch), "--seq", str(a.seq), "--stacks", "lorafuse",
                       "--random-init"])
    spec = {"stack": "lorafuse", "method": a.method, "shape": a.shape, "vocab_size": None, "batch": a.batch,
            "seq": a.seq, "device": "cuda", "dtype": "bfloat16", "r": 16, "alpha": 32.0, "dropout": 0.0,
            "optimizer": "paged_adamw_8bit", "gc": True, "fast_path": "auto", "seed": 0, "random_init": True,
            "cuda_graphs": not a.no_graphs}
    from lorafuse.plan.shapes import builtin_shape

    spec["vocab_size"] = builtin_shape(a.shape).vocab_size
    device = torch.device("cuda")
    step, info = lorafuse_stack.build(spec, device)
    batches = make_batches(spec, device, 4)
    for b in batches[:2]:
        step(b)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500_000)
    for b in batches[2:]:
        step(b)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, groups = alive_at_peak(trace)
    w = _workload(args, a.method, kernels="fused" if info["fast_path"]["applied"] else "reference",
                  loss="fused" if info["fused_loss"] else "chunked")
    est = estimate(w)
    report = {"shape": a.shape, "method": a.method, "batch": a.batch, "seq": a.seq, "graphs": info.get("cuda_graphs"),
              "allocated_before_gib": base / GIB, "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
              "trace_peak_above_start_gib": peak / GIB, "predicted_peak_alloc_gib": est.peak_alloc / GIB,
              "predicted_phase": est.phase, "predicted_components_gib": {k: v / GIB for k, v in est.components.items()},
              "alive_at_peak_gib": {k: v / GIB for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:25]}}
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"memory-peak-{a.shape}-{a.method}-{a.batch}x{a.seq}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

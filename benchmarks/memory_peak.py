"""Where a lorafuse training step's memory peak happens: for explaining a planner miss.

    python benchmarks/memory_peak.py --shape qwen2.5-1.5b --method qlora --batch 2 --seq 2048 [--out DIR]

Builds the model as `lorafuse bench --random-init` does (benchmarks/peers/lorafuse_stack.py), runs 2 warm-up
steps, then 2 steps with allocator readings at every decoder layer's forward, recompute and backward boundary
(`PhaseMarks`). It prints the windows between readings with the highest peaks, beside the planner's phase and
components for the same workload. Meant for CUDA; on a CPU it runs and every reading is 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "peers")]

GIB = 1024**3


class PhaseMarks:
    """Allocator readings at layer boundaries: (tag, allocated now, peak since the previous mark), GiB.

    Forward hooks on each decoder layer and on the final norm mark the forward; hooks on their outputs'
    gradients mark the backward (the gradient of layer i's output arrives just before layer i's backward).
    The recompute inside the backward fires the forward hooks again ("re" tags). No allocator history is
    recorded (recording it crashed the fused MLP's backward under checkpointing on torch 2.11)."""

    def __init__(self, model):
        import torch

        self.torch, self.marks, self.in_backward = torch, [], False
        layers = list(model.model.layers)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(
                lambda m, a, i=i: self.mark(("re" if self.in_backward else "") + f"fwd{i}<")
            )
            layer.register_forward_hook(lambda m, a, out, i=i: self._out(out, i))
        model.model.norm.register_forward_hook(lambda m, a, out: self._out(out, "norm"))

    def _out(self, out, i):
        t = out[0] if isinstance(out, tuple) else out
        self.mark(("re" if self.in_backward else "") + f"fwd{i}>")
        if self.torch.is_tensor(t) and t.requires_grad and not self.in_backward:
            t.register_hook(lambda g, i=i: self._grad(i))

    def _grad(self, i):
        self.in_backward = True
        self.mark(f"bwd{i}<")

    def mark(self, tag):
        cuda = self.torch.cuda
        if not cuda.is_available():
            self.marks.append((tag, 0.0, 0.0))
            return
        self.marks.append((tag, cuda.memory_allocated() / GIB, cuda.max_memory_allocated() / GIB))
        cuda.reset_peak_memory_stats()

    def step_done(self):
        self.mark("step end (optimizer done)")
        self.in_backward = False


def _live_blocks(top: int = 16) -> list:
    """What is allocated between steps, by block size: [[MiB per block, count, GiB in all], ...], largest total
    first (the allocator's snapshot, which needs no history recording)."""
    import collections

    import torch

    sizes = collections.Counter(
        b["size"] for seg in torch.cuda.memory_snapshot() for b in seg["blocks"] if b["state"] == "active_allocated"
    )
    rows = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:top]
    return [[round(size / 2**20, 3), count, round(size * count / GIB, 4)] for size, count in rows]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--method", default="qlora", choices=("qlora", "lora"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--offload", action="store_true", help="offload checkpointed layer inputs (bench --offload)")
    p.add_argument(
        "--host-embeddings", action="store_true", help="input table in host memory (bench --host-embeddings)"
    )
    p.add_argument(
        "--host-head", action="store_true", help="output head in host memory between losses (bench --host-head)"
    )
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _bench_args(a, device):
    """The harness's arguments for `lorafuse bench --random-init --stacks lorafuse` with this run's settings."""
    from bench import parse_args

    argv = ["--shape", a.shape, "--batch", str(a.batch), "--seq", str(a.seq), "--stacks", "lorafuse"]
    argv += ["--random-init", "--device", device.type]
    flags = {"--no-graphs": a.no_graphs, "--offload": a.offload, "--host-embeddings": a.host_embeddings}
    return parse_args(argv + [f for f, on in {**flags, "--host-head": a.host_head}.items() if on])


def _marked_steps(step, batches, device) -> PhaseMarks:
    """2 warm-up steps, then the rest with allocator readings at the layer boundaries."""
    import torch

    for b in batches[:2]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    marks = PhaseMarks(step.model)
    for b in batches[2:]:
        marks.mark("step start")
        step(b)
        marks.step_done()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return marks


def _report(a, marks: PhaseMarks, est, info: dict, live: list) -> dict:
    top = sorted(range(len(marks.marks)), key=lambda k: -marks.marks[k][2])[:8]
    windows = [
        {
            "after": marks.marks[k - 1][0] if k else "-",
            "until": marks.marks[k][0],
            "peak_gib": round(marks.marks[k][2], 4),
            "allocated_at_end_gib": round(marks.marks[k][1], 4),
        }
        for k in sorted(top)
    ]
    return {
        "shape": a.shape,
        "method": a.method,
        "batch": a.batch,
        "seq": a.seq,
        "graphs": info.get("cuda_graphs"),
        "max_allocated_gib": max(m[2] for m in marks.marks),
        "predicted_peak_alloc_gib": est.peak_alloc / GIB,
        "predicted_phase": est.phase,
        "predicted_components_gib": {k: round(v / GIB, 4) for k, v in est.components.items()},
        "highest_windows": windows,
        "live_at_step_end": live,
        "timeline": [[t, round(x, 4), round(y, 4)] for t, x, y in marks.marks],
    }


def main(argv=None) -> int:
    import lorafuse_stack
    import torch
    from bench import _lorafuse_workload, _spec
    from bench_common import make_batches

    from lorafuse.plan.memory import estimate

    a = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = _bench_args(a, device)
    spec = _spec(args, "lorafuse", a.method, folder=None)  # as `lorafuse bench --random-init` runs it
    step, info = lorafuse_stack.build(spec, device)
    marks = _marked_steps(step, make_batches(spec, device, 4), device)
    live = _live_blocks() if device.type == "cuda" else []
    report = _report(a, marks, estimate(_lorafuse_workload(args, a.method, info)), info, live)
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"memory-peak-{a.shape}-{a.method}-{a.batch}x{a.seq}.json").write_text(
            json.dumps(report, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

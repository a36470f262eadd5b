"""How benchmarks/bench_kernels.py times a kernel and prices it against the card's floors.

The card's two floors are measured first: a 8192^3 GEMM in the benchmark's dtype for FLOP/s, a 1 GiB device copy
for bytes/s; a row's floor is max(FLOPs / rate, bytes / bandwidth). Timing: CUDA events around each call,
--warmup calls first (Triton autotunes there), the median of --iters calls with p10 and p90. Peak memory is the
growth of torch.cuda.max_memory_allocated over the inputs during one call. On a CPU (--smoke) the calls are timed
with perf_counter and the floors are placeholders: that run checks that every row runs, its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch


@dataclasses.dataclass
class Bench:
    warmup: int
    iters: int
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    flops_per_s: float = 0.0
    bytes_per_s: float = 0.0

    def time(self, fn) -> tuple[float, float, float]:
        """(median, p10, p90) of `fn`'s time in ms."""
        for _ in range(self.warmup):
            fn()
        if self.device == "cpu":
            ms = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
            ms.sort()
            return statistics.median(ms), ms[len(ms) // 10], ms[(len(ms) * 9) // 10]
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.iters)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in events)
        return statistics.median(ms), ms[len(ms) // 10], ms[(len(ms) * 9) // 10]

    def floor_ms(self, flops: float, nbytes: float) -> float:
        return 1e3 * max(flops / self.flops_per_s, nbytes / self.bytes_per_s)

    def measure_floors(self) -> None:
        if self.device == "cpu":
            self.flops_per_s, self.bytes_per_s = 1e11, 1e10
            return
        a = torch.randn(8192, 8192, device=self.device, dtype=self.dtype)
        ms, _, _ = self.time(lambda: a @ a)
        self.flops_per_s = 2 * 8192**3 / (ms / 1e3)
        src = torch.randn(2**28, device=self.device)  # 1 GiB
        dst = torch.empty_like(src)
        ms, _, _ = self.time(lambda: dst.copy_(src))
        self.bytes_per_s = 2 * src.numel() * 4 / (ms / 1e3)
        gemm, copy = self.flops_per_s / 1e12, self.bytes_per_s / 1e9
        print(f"floors: bf16 GEMM {gemm:.0f} TFLOP/s, copy {copy:.0f} GB/s (read+write)")

    def peak_mb(self, fn) -> float:
        if self.device == "cpu":
            return 0.0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def train_step(fn, inputs, grad_out):
    """forward + backward w.r.t. `inputs` (torch.autograd.grad: nothing accumulates between calls)."""

    def run():
        out = fn()
        torch.autograd.grad(out, inputs, grad_out if out.dim() else None)

    return run


def peer_error(op, variant, shape, e) -> dict:
    return dict(op=op, variant=variant, shape=shape, error=f"{type(e).__name__}: {e}"[:200])


def row(b: Bench, op, variant, shape, fn, flops, nbytes) -> dict:
    """One JSON row: `fn` timed, its floor and its peak memory, or the error that stopped it."""
    try:
        ms, p10, p90 = b.time(fn)
        mem = b.peak_mb(fn)
    except Exception as e:  # noqa: BLE001  (a peer's API change or an OOM must not end the run)
        return peer_error(op, variant, shape, e)
    floor = b.floor_ms(flops, nbytes)
    return dict(
        op=op,
        variant=variant,
        shape=shape,
        ms=round(ms, 4),
        p10=round(p10, 4),
        p90=round(p90, 4),
        floor_ms=round(floor, 4),
        x_floor=round(ms / floor, 2),
        tflops=round(flops / ms / 1e9, 1),
        peak_mb=round(mem, 1),
    )

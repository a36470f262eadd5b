"""Probe: FP8 (e4m3) base GEMMs against bf16 on this card, at the Llama-2-7B projection shapes.

Question it answers before any FP8 path is built: how much faster is torch._scaled_mm with row-wise scales than
the bf16 cuBLAS GEMM at M = 2048 tokens, what does quantizing the activation cost, and how far is each from the
exact product. Prints a table and writes JSON lines to OUT/fp8_probe.jsonl.

    python benchmarks/fp8_probe.py --out OUT [--m 2048]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def rowwise(t: torch.Tensor, col_scale: torch.Tensor | None = None):
    """(t8, scale (rows, 1) fp32) with t ~= t8 * scale row by row; `col_scale` multiplies t's columns first."""
    if col_scale is not None:
        t = t * col_scale
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


def timed(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # us


def rel_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


def probe(m: int, k: int, n: int, outliers: bool) -> dict:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.float32)
    if outliers:  # a few channels 50x the rest, as LLM activations have
        x[:, :: max(1, k // 6)] *= 50
    x = x.to(torch.bfloat16)
    w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    exact = x.double() @ w.double().t()
    bf16 = torch.mm(x, w.t())
    w8, sw = rowwise(w)
    x8, sx = rowwise(x)
    row = {"m": m, "k": k, "n": n, "outliers": outliers}
    for fast in (False, True):
        y8 = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16, use_fast_accum=fast)
        row[f"err_fp8{'_fast' if fast else ''}"] = rel_err(y8, exact)
        row[f"us_fp8{'_fast' if fast else ''}"] = timed(
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16,
                                     use_fast_accum=fast))
    row["err_bf16"] = rel_err(bf16, exact)
    row["us_bf16"] = timed(lambda: torch.mm(x, w.t()))
    row["us_quant_x_eager"] = timed(lambda: rowwise(x))
    # the backward's dx = dY W with W's row scales folded into dY's columns: W8 must be K-major as mat2
    dy = torch.randn(m, n, device=dev, generator=g).to(torch.bfloat16)
    exact_dx = dy.double() @ w.double()
    w8t = w8.t().contiguous()  # (K, N) row-major: mat2 = w8t.t() is (N, K) column-major
    d8, sd = rowwise(dy, sw.t().to(torch.bfloat16))
    ones = torch.ones(1, k, device=dev)
    dx8 = torch._scaled_mm(d8, w8t.t(), scale_a=sd, scale_b=ones, out_dtype=torch.bfloat16)
    row["err_dx_bf16"] = rel_err(torch.mm(dy, w), exact_dx)
    row["err_dx_fp8"] = rel_err(dx8, exact_dx)
    row["us_dx_bf16"] = timed(lambda: torch.mm(dy, w))
    row["us_dx_fp8"] = timed(lambda: torch._scaled_mm(d8, w8t.t(), scale_a=sd, scale_b=ones,
                                                      out_dtype=torch.bfloat16))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--m", type=int, default=2048)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)]
    rows = [probe(args.m, k, n, o) for k, n in shapes for o in (False, True)]
    with open(os.path.join(args.out, "fp8_probe.jsonl"), "a") as f:
        for r in rows:
            r["card"] = torch.cuda.get_device_name()
            f.write(json.dumps(r) + "\n")
    cols = ["k", "n", "outliers", "us_bf16", "us_fp8", "us_fp8_fast", "us_quant_x_eager", "us_dx_bf16", "us_dx_fp8",
            "err_bf16", "err_fp8", "err_fp8_fast", "err_dx_bf16", "err_dx_fp8"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()

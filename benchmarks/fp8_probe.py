"""Probe: FP8 (e4m3) base GEMMs against bf16 on this card, at the Llama-2-7B projection shapes.

Question it answers before any FP8 path is built: how much faster is torch._scaled_mm with row-wise scales than
the bf16 cuBLAS GEMM at M = 2048 tokens, what does quantizing the activation cost, and how far is each from the
exact product. Prints a table and writes JSON lines to OUT/fp8_probe.jsonl.

    python benchmarks/fp8_probe.py --out OUT [--m 2048] [--decode]

--decode times lorafuse's own pieces of the FP8 backward instead, per 7B weight shape: the NF4 decode to bf16 (what
the bf16 backward reads), to e4m3, to e4m3 transposed (what the FP8 backward reads), dY's quantization, and the dX
GEMM in bf16 against fp8.grad_input; each from eager calls (us_*, bound by the host's launch overhead for the short
kernels) and replayed from a CUDA graph (graph_us_*, the kernels alone, as training runs them).
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
            lambda: torch._scaled_mm(
                x8, w8.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16, use_fast_accum=fast
            )
        )
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
    row["us_dx_fp8"] = timed(lambda: torch._scaled_mm(d8, w8t.t(), scale_a=sd, scale_b=ones, out_dtype=torch.bfloat16))
    return row


def graph_timed(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of fn with `calls` calls captured in one CUDA graph: the kernels' time without the
    host's launch overhead (which bounds `timed` for these short kernels)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, replays) / calls


def decode_probe(m: int, n: int, k: int) -> dict:
    """W (n, k) NF4: decode times and the backward's dX = dY W both ways (lorafuse.kernels)."""
    from lorafuse.kernels import fp8
    from lorafuse.kernels.nf4_dequant import nf4_dequantize
    from lorafuse.quant.nf4 import quantize_nf4

    g = torch.Generator(device="cuda").manual_seed(0)
    w = quantize_nf4(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    sw = fp8.nf4_row_scales(w)
    buf16 = torch.empty(n * k, dtype=torch.bfloat16, device="cuda")
    buf8 = torch.empty(n * k, dtype=fp8.E4M3, device="cuda")
    dy = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
    dense = nf4_dequantize(w, torch.bfloat16, out=buf16).view(n, k)
    w8t = fp8.nf4_to_fp8_t(w, buf8, sw)
    cases = {
        "decode_bf16": lambda: nf4_dequantize(w, torch.bfloat16, out=buf16),
        "decode_fp8": lambda: fp8.nf4_to_fp8(w, buf8, sw),
        "decode_fp8_t": lambda: fp8.nf4_to_fp8_t(w, buf8, sw),
        "quant_dy": lambda: fp8.quantize_rows(dy, col_scale=sw),
        "dx_bf16": lambda: torch.mm(dy, dense),
        "dx_fp8": lambda: fp8.grad_input(dy, w8t, sw),
    }
    row = {"kind": "decode", "m": m, "n": n, "k": k}
    for name, fn in cases.items():
        row[f"us_{name}"] = timed(fn)  # with the host's launch overhead
        row[f"graph_us_{name}"] = graph_timed(fn)  # the kernels alone
    row["floor_us_fp8"] = (n * k * 1.5) / 4.8e6  # bytes moved (0.5 read + 1 written) at the H200's 4.8 TB/s
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--decode", action="store_true", help="time lorafuse's FP8 backward pieces (see the docstring)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.decode:
        rows = [decode_probe(args.m, n, k) for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)]]
        cols = [
            "n",
            "k",
            "graph_us_decode_bf16",
            "graph_us_decode_fp8",
            "graph_us_decode_fp8_t",
            "floor_us_fp8",
            "graph_us_quant_dy",
            "graph_us_dx_bf16",
            "graph_us_dx_fp8",
            "us_decode_fp8_t",
        ]
        with open(os.path.join(args.out, "fp8_probe.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "card": torch.cuda.get_device_name()}) + "\n")
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
        return
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)]
    rows = [probe(args.m, k, n, o) for k, n in shapes for o in (False, True)]
    with open(os.path.join(args.out, "fp8_probe.jsonl"), "a") as f:
        for r in rows:
            r["card"] = torch.cuda.get_device_name()
            f.write(json.dumps(r) + "\n")
    cols = [
        "k",
        "n",
        "outliers",
        "us_bf16",
        "us_fp8",
        "us_fp8_fast",
        "us_quant_x_eager",
        "us_dx_bf16",
        "us_dx_fp8",
        "err_bf16",
        "err_fp8",
        "err_fp8_fast",
        "err_dx_bf16",
        "err_dx_fp8",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()

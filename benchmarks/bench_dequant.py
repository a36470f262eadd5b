"""NF4 dequantization launch sweep: every `lorafuse.kernels.nf4_dequant.SWEEP` configuration against the
previous kernel (`BYTEWISE`) and a device copy of the same output size, on Llama-2-7B's projection shapes.

    PYTHONPATH=. python benchmarks/bench_dequant.py --out /tmp/dequant.jsonl
    PYTHONPATH=. python benchmarks/bench_dequant.py --configs tiled-b2048-w4-v4,bytewise-b1024-w4 --iters 100
    python benchmarks/bench_dequant.py --smoke          # CPU, Triton's interpreter, tiny shapes: checks the script

Weights: random N(0, 0.02) bf16 quantized by lorafuse.quant.nf4.quantize_nf4 (blocksize 64, double quant) at
4096x4096 (q/k/v/o), 11008x4096 (gate/up) and 4096x11008 (down); output bf16 (--dtype).

Method (DESIGN.md, "Performance method"): bytes moved = the weight's own bytes (packed codes, uint8 absmax,
nested absmax) + the output written; the peer is `dst.copy_(src)` of a same-size output-dtype tensor (reads and
writes 2 bytes per weight each). Every timed call is preceded by a read of a 256 MiB buffer so the weight comes
from HBM, as in a training step, and leaves no dirty lines behind; the read and the call are queued behind a
`torch.cuda._sleep` so the host's launch cost (tens of microseconds for a Triton launch, more than the kernel)
is never what the events measure. CUDA events around each call, --warmup calls first, the median of --iters.
Each configuration's output is compared with `NF4Weight.dequantize` (torch.equal) before it is timed.

Output: a table (config, shape, us, effective GB/s, fraction of the copy's GB/s, speed-up over BYTEWISE), then
per configuration the time of one step's 672 dequantizations (32 layers x 7 projections x 3 calls: forward,
recompute, backward), and one JSON line per row appended to --out (default under /tmp: move the file into
benchmarks/results/ when it is worth keeping).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before lorafuse.kernels is imported: the kernels then run in Triton's CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lorafuse, installed or not

from lorafuse.kernels import _runtime, nf4_dequant  # noqa: E402
from lorafuse.quant.nf4 import quantize_nf4  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008)}
SMOKE_SHAPES = {"64x128": (64, 128), "37x53": (37, 53)}
CALLS_PER_LAYER = {"4096x4096": 4 * 3, "11008x4096": 2 * 3, "4096x11008": 1 * 3}  # projections x calls
LAYERS = 32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Timer:
    """Median / p10 / p90 microseconds of `fn`, each call on a cold L2, with the queue kept ahead of the GPU."""

    def __init__(self, warmup: int, iters: int, flush: bool, device: str):
        self.warmup, self.iters, self.device = warmup, iters, device
        self.flush_buf = torch.empty(64 << 20, dtype=torch.float32, device=device) if flush else None
        if self.flush_buf is not None:
            self.flush_buf.normal_()

    def _cold(self):
        if self.flush_buf is not None:
            self.flush_buf.max()  # a read: evicts the weight without leaving lines to write back

    def __call__(self, fn) -> tuple[float, float, float]:
        for _ in range(self.warmup):
            fn()
        if self.device == "cpu":  # --smoke: the numbers mean nothing
            us = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                us.append((time.perf_counter() - t0) * 1e6)
        else:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.iters)
            ]
            torch.cuda.synchronize()
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time while the host queues every call below
            for start, end in events:
                self._cold()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            us = [s.elapsed_time(e) * 1e3 for s, e in events]
        us.sort()
        return statistics.median(us), us[len(us) // 10], us[(len(us) * 9) // 10]


def _config_row(timer, cfg, w, want, buf) -> dict:
    """Check `cfg`'s output bit for bit, then time it; a configuration that fails to compile is a row too."""
    n = w.numel
    out = buf[:n]
    try:
        out.fill_(float("nan"))
        nf4_dequant._launch(w, out, config=cfg)
        exact = bool(torch.equal(out.view(w.shape), want))
        us, p10, p90 = timer(lambda: nf4_dequant._launch(w, out, config=cfg))
    except Exception as e:  # noqa: BLE001  (e.g. a Triton version without tl.gather: report it, time the rest)
        return dict(error=f"{type(e).__name__}: {e}"[:300])
    return dict(exact=exact, us=round(us, 2), p10=round(p10, 2), p90=round(p90, 2))


def _shape_rows(timer, shape_name, shape, dtype, configs, device):
    w = quantize_nf4(torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02, blocksize=64, double_quant=True)
    n = w.numel
    want = w.dequantize(dtype)
    buf = torch.empty(n, dtype=dtype, device=device)
    src = torch.randn(n, device=device).to(dtype)
    copy_us, _, _ = timer(lambda: buf.copy_(src))
    copy_bytes = 2 * n * src.element_size()
    copy_gbps = copy_bytes / copy_us / 1e3
    moved = w.nbytes() + n * buf.element_size()
    base = dict(
        shape=shape_name,
        numel=n,
        dtype=str(dtype).removeprefix("torch."),
        bytes=moved,
        copy_us=round(copy_us, 2),
        copy_gbps=round(copy_gbps, 1),
        floor_us=round(moved / copy_gbps / 1e3, 2),
    )
    rows = []
    for cfg in configs:
        r = dict(
            config=str(cfg),
            block=cfg.block,
            num_warps=cfg.num_warps,
            vec=cfg.vec,
            shared_code=cfg.shared_code,
            bytewise=cfg.bytewise,
            **base,
            **_config_row(timer, cfg, w, want, buf),
        )
        if "us" in r:
            r["gbps"] = round(moved / r["us"] / 1e3, 1)
            r["frac_copy"] = round(r["gbps"] / copy_gbps, 3)
        rows.append(r)
    old = next((r["us"] for r in rows if r["config"] == str(nf4_dequant.BYTEWISE) and "us" in r), None)
    for r in rows:
        if old and "us" in r:
            r["vs_bytewise"] = round(old / r["us"], 3)
    return rows


def _print_row(r):
    if "error" in r:
        print(f"{r['config']:<28} {r['shape']:<11} ERROR {r['error']}")
        return
    flag = "" if r["exact"] else "  NOT EXACT"
    print(
        f"{r['config']:<28} {r['shape']:<11} {r['us']:>8.2f} {r['floor_us']:>8.2f} {r['gbps']:>8.0f} "
        f"{r['frac_copy']:>7.3f} {r.get('vs_bytewise', float('nan')):>8.3f}{flag}"
    )


def _step_summary(rows, configs) -> list[dict]:
    """Per configuration: one training step's dequantization time on Llama-2-7B (shapes timed above)."""
    out = []
    for cfg in configs:
        mine = {r["shape"]: r for r in rows if r["config"] == str(cfg) and "us" in r}
        if set(mine) != set(CALLS_PER_LAYER):
            continue
        step_ms = LAYERS * sum(k * mine[s]["us"] for s, k in CALLS_PER_LAYER.items()) / 1e3
        floor_ms = LAYERS * sum(k * mine[s]["floor_us"] for s, k in CALLS_PER_LAYER.items()) / 1e3
        calls = LAYERS * sum(CALLS_PER_LAYER.values())
        out.append(
            dict(
                summary="llama2-7b-step",
                config=str(cfg),
                calls=calls,
                step_ms=round(step_ms, 3),
                mean_us=round(step_ms * 1e3 / calls, 2),
                floor_ms=round(floor_ms, 3),
                x_floor=round(step_ms / floor_ms, 3),
                exact=all(r["exact"] for r in mine.values()),
            )
        )
    if out:
        print(
            f"\n{'config':<28} {'ms/step':>8} {'us/call':>8} {'floor ms':>9} {'x floor':>8}   "
            f"({out[0]['calls']} calls: {LAYERS} layers x 7 projections x 3)"
        )
        for s in sorted(out, key=lambda s: s["step_ms"]):
            print(
                f"{s['config']:<28} {s['step_ms']:>8.3f} {s['mean_us']:>8.2f} {s['floor_ms']:>9.3f} "
                f"{s['x_floor']:>8.3f}{'' if s['exact'] else '  NOT EXACT'}"
            )
    return out


def _pick_configs(spec: str | None):
    by_name = {str(c): c for c in nf4_dequant.SWEEP}
    if not spec:
        return list(nf4_dequant.SWEEP)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in by_name]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {list(by_name)} (lorafuse.kernels.nf4_dequant.SWEEP)")
    return [by_name[s] for s in names]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None, help="comma-separated names from nf4_dequant.SWEEP (default: all)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-flush", action="store_true", help="leave the weight in L2 between calls")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    ap.add_argument("--out", default=f"/tmp/bench_dequant-{datetime.date.today()}.jsonl", help="JSONL, appended")
    return ap.parse_args(argv)


def _where(args):
    """(device, shapes, the context to run in) for this run, or None when it cannot run here (said on stderr).
    --smoke sets its own warm-up, iterations and dtype."""
    if args.smoke:
        args.warmup, args.iters, args.dtype = 1, 3, "float32"
        return "cpu", SMOKE_SHAPES, _runtime.cpu_kernels()
    if not (torch.cuda.is_available() and _runtime.HAS_TRITON):
        print(
            "bench_dequant.py times the Triton NF4 kernel and needs a CUDA GPU with triton installed; "
            "on a CPU run `python benchmarks/bench_dequant.py --smoke` (checks the script) or "
            "`python -m pytest tests/kernels/test_nf4_dequant.py` (checks the kernel).",
            file=sys.stderr,
        )
        return None
    return "cuda", SHAPES, torch.no_grad()


def _sweep(timer, shapes: dict, dtype, configs, device) -> list[dict]:
    """Every configuration on every shape, printed as it comes, after the copy it is measured against."""
    print(f"{'config':<28} {'shape':<11} {'us':>8} {'floor':>8} {'GB/s':>8} {'x copy':>7} {'speedup':>8}")
    rows = []
    for name, shape in shapes.items():
        shape_rows = _shape_rows(timer, name, shape, dtype, configs, device)
        print(
            f"{'torch copy_ (peer)':<28} {name:<11} {shape_rows[0]['copy_us']:>8.2f} {'':>8} "
            f"{shape_rows[0]['copy_gbps']:>8.0f} {1.0:>7.3f}"
        )
        for r in shape_rows:
            _print_row(r)
        rows += shape_rows
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    where = _where(args)
    if where is None:
        return 2
    device, shapes, ctx = where
    configs = _pick_configs(args.configs)
    torch.manual_seed(0)
    timer = Timer(args.warmup, args.iters, flush=not args.no_flush and device == "cuda", device=device)
    meta = dict(
        bench="nf4_dequant",
        card=torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke",
        torch=torch.__version__,
        triton=_runtime.TRITON_VERSION,
        flush_l2=timer.flush_buf is not None,
        iters=args.iters,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    print(
        f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}, {args.dtype} output, "
        f"{'cold' if meta['flush_l2'] else 'warm'} L2, median of {args.iters}"
    )
    with ctx:
        rows = _sweep(timer, shapes, DTYPES[args.dtype], configs, device)
    summary = _step_summary(rows, configs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows + summary:
            fh.write(json.dumps({**r, **meta}) + "\n")
    print(f"\n{len(rows) + len(summary)} rows appended to {out}")
    bad = [r["config"] + " " + r["shape"] for r in rows if not r.get("exact", False)]
    if bad:
        print(f"NOT bit-exact or failed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

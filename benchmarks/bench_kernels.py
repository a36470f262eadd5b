"""Kernel benchmark: every lorafuse kernel vs its PyTorch reference vs the torch/cuBLAS (and peer) baseline.

    python benchmarks/bench_kernels.py                                  # both models, every op
    python benchmarks/bench_kernels.py --model llama3-8b --ops lora_linear,ce --iters 50

Shapes: Llama-2-7B (hidden 4096, intermediate 11008, vocab 32000, 4 x 512 tokens) and Llama-3-8B
(4096 / 14336, vocab 128256, 8 KV heads, 2 x 2048 tokens), LoRA r = 16 on every projection.

Method (DESIGN.md, "Performance method"; the timing and the floors in kernel_timing.py): the card's two floors
are measured first (a bf16 8192^3 GEMM for FLOP/s, a 1 GiB device copy for bytes/s); every row prints its own
floor max(FLOPs / rate, bytes / bandwidth) and time / floor. Timing: CUDA events around each call, warm-up
calls first (Triton autotunes there), the median of --iters calls (p10/p90 in the JSON); inputs are
random, never zeros; training ops are timed forward + backward. Peak memory is the growth of
torch.cuda.max_memory_allocated over the inputs during one forward + backward.
Peers (timed when importable): bitsandbytes' CUDA NF4 dequantization, Liger's RMSNorm, RoPE, SwiGLU
and fused linear cross-entropy.

Output: a table on stdout; one JSON line per row appended to benchmarks/results/<date>-<card>-kernels.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from kernel_timing import Bench, peer_error, row, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lorafuse, installed or not

from lorafuse.kernels import _runtime  # noqa: E402
from lorafuse.kernels import lora_linear as ll  # noqa: E402
from lorafuse.kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402
from lorafuse.kernels.nf4_dequant import nf4_dequantize  # noqa: E402
from lorafuse.kernels.reference import (
    LoRAWeights,
    fused_linear_cross_entropy_reference,  # noqa: E402
    lora_linear_reference,
    rms_norm_reference,
    rope_reference,
    swiglu_mlp_reference,
)
from lorafuse.kernels.rmsnorm import rms_norm  # noqa: E402
from lorafuse.kernels.rope import apply_rope  # noqa: E402
from lorafuse.kernels.swiglu_mlp import swiglu_mlp  # noqa: E402
from lorafuse.options import KernelOptions  # noqa: E402
from lorafuse.quant.nf4 import quantize_nf4  # noqa: E402

MODELS = {
    "llama2-7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000, tokens=(4, 512)),
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tokens=(2, 2048)),
}
SMOKE = dict(hidden=64, inter=96, heads=4, kv_heads=2, head_dim=16, vocab=300, tokens=(2, 16))
RANK = 16
# Every timed closure below is built and timed inside one loop iteration, so capturing loop variables
# late (ruff B023) is intended. b.device and b.dtype: cuda and bf16, or with --smoke the CPU in fp32.


# --- ops -----------------------------------------------------------------------------------------


def bench_nf4_dequant(b, cfg):
    dev, dt = b.device, b.dtype
    h, f = cfg["hidden"], cfg["inter"]
    for shape in [(h, h), (f, h), (h, f)]:
        w = quantize_nf4(torch.randn(shape, device=dev, dtype=dt) * 0.02)
        n = w.numel
        nbytes = n / 2 + 2 * n + n / 64
        name = f"{shape[0]}x{shape[1]}"
        yield row(b, "nf4_dequant", "triton", name, lambda: nf4_dequantize(w, dt), 0, nbytes)
        yield row(b, "nf4_dequant", "reference", name, lambda: w.dequantize(dt), 0, nbytes)
        try:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(
                torch.randn(shape, device=dev, dtype=dt), quant_type="nf4", compress_statistics=True
            )
            yield row(b, "nf4_dequant", "bitsandbytes", name, lambda: bnbf.dequantize_4bit(packed, state), 0, nbytes)
        except ImportError:
            pass
        except Exception as e:  # noqa: BLE001  (a peer's API drift is a row, not a crash)
            yield peer_error("nf4_dequant", "bitsandbytes", name, e)


def _lora_weights(b, k, n, base):
    w = torch.randn(n, k, device=b.device, dtype=b.dtype) / k**0.5
    return LoRAWeights(
        quantize_nf4(w) if base == "nf4" else w,
        None,
        (torch.randn(RANK, k, device=b.device) / k**0.5).requires_grad_(),
        (torch.randn(n, RANK, device=b.device) * 0.01).requires_grad_(),
        2.0,
        0.0,
        None,
    )


def _lora_cost(m, k, n, base):
    flops = 4 * m * n * k + 2 * m * RANK * (3 * k + 3 * n)  # x W^T, dY W; 6 rank-r GEMMs
    w_bytes = (0.5 if base == "nf4" else 2) * n * k * 2
    return flops, w_bytes + 2 * (3 * m * k + 3 * m * n)


def _lora_rows(b, m, k, n, base, tag):
    """The fused linear as it runs, with experimental.fused_ds_db (dS and dB from one pass over dY), and the
    reference, on the same inputs."""
    lw = _lora_weights(b, k, n, base)
    x = torch.randn(m, k, device=b.device, dtype=b.dtype, requires_grad=True)
    dy = torch.randn(m, n, device=b.device, dtype=b.dtype)
    flops, nbytes = _lora_cost(m, k, n, base)
    inputs = [x, lw.lora_A, lw.lora_B]
    for variant, opts in (("fused", KernelOptions()), ("fused+dsdb", KernelOptions(fused_ds_db=True))):
        spec = dataclasses.replace(lw, opts=opts)
        fn = train_step(lambda: ll.lora_linear(x, spec), inputs, dy)
        yield row(b, "lora_linear", f"{base}-{variant}", tag, fn, flops, nbytes)
    fn = train_step(lambda: lora_linear_reference(x, lw), inputs, dy)
    yield row(b, "lora_linear", f"{base}-reference", tag, fn, flops, nbytes)


def bench_lora_linear(b, cfg):
    dev, dt = b.device, b.dtype
    m = cfg["tokens"][0] * cfg["tokens"][1]
    h, f, kv = cfg["hidden"], cfg["inter"], cfg["kv_heads"] * cfg["head_dim"]
    for name, k, n in [("q_proj", h, h), ("k_proj", h, kv), ("gate_proj", h, f), ("down_proj", f, h)]:
        tag = f"{name} M{m} K{k} N{n}"
        for base in ("dense", "nf4"):
            yield from _lora_rows(b, m, k, n, base, tag)
        w = torch.randn(n, k, device=dev, dtype=dt)
        x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(m, n, device=dev, dtype=dt)
        fn = train_step(lambda: torch.nn.functional.linear(x, w), [x], dy)
        yield row(
            b, "lora_linear", "base-gemm-only (cuBLAS floor)", tag, fn, 4 * m * n * k, 2 * (n * k * 2 + 2 * m * k)
        )


def bench_rmsnorm(b, cfg):
    dev, dt = b.device, b.dtype
    m, h = cfg["tokens"][0] * cfg["tokens"][1], cfg["hidden"]
    x = torch.randn(m, h, device=dev, dtype=dt, requires_grad=True)
    w = 1 + 0.1 * torch.randn(h, device=dev, dtype=dt)
    dy = torch.randn(m, h, device=dev, dtype=dt)
    tag, nbytes = f"M{m} H{h}", 5 * m * h * 2
    yield row(b, "rmsnorm", "triton", tag, train_step(lambda: rms_norm(x, w), [x], dy), 0, nbytes)
    yield row(b, "rmsnorm", "reference", tag, train_step(lambda: rms_norm_reference(x, w), [x], dy), 0, nbytes)
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        norm = LigerRMSNorm(h, eps=1e-6, in_place=False).to(dev, dt)
        yield row(b, "rmsnorm", "liger", tag, train_step(lambda: norm(x), [x], dy), 0, nbytes)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001
        yield peer_error("rmsnorm", "liger", tag, e)


def bench_rope(b, cfg):
    dev, dt = b.device, b.dtype
    (bsz, t), hq, hk, d = cfg["tokens"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q0 = torch.randn(bsz, t, hq, d, device=dev, dtype=dt, requires_grad=True)
    k0 = torch.randn(bsz, t, hk, d, device=dev, dtype=dt, requires_grad=True)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=dev).float() / d)
    emb = torch.cat([torch.arange(t, device=dev)[:, None].float() * inv] * 2, -1)[None]
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    dq, dk = torch.randn_like(q0), torch.randn_like(k0)
    tag, nbytes = f"B{bsz} T{t} Hq{hq} Hk{hk} D{d}", 4 * (q0.numel() + k0.numel()) * 2

    def step(fn):
        def run():
            q, k = fn(q0 * 1, k0 * 1)  # the projection outputs the attention would rotate
            torch.autograd.grad([q, k], [q0, k0], [dq, dk])

        return run

    yield row(b, "rope", "triton", tag, step(lambda q, k: apply_rope(q, k, cos, sin)), 0, nbytes)
    yield row(b, "rope", "reference", tag, step(lambda q, k: rope_reference(q, k, cos, sin)), 0, nbytes)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        def liger(q, k):  # Liger's layout is (B, H, T, D)
            return liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

        yield row(b, "rope", "liger", tag, step(liger), 0, nbytes)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001
        yield peer_error("rope", "liger", tag, e)


def bench_swiglu_mlp(b, cfg):
    dev, dt = b.device, b.dtype
    m, h, f = cfg["tokens"][0] * cfg["tokens"][1], cfg["hidden"], cfg["inter"]
    for base in ("dense", "nf4"):
        projs = (_lora_weights(b, h, f, base), _lora_weights(b, h, f, base), _lora_weights(b, f, h, base))
        x = torch.randn(m, h, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(m, h, device=dev, dtype=dt)
        inputs = [x] + [t for p in projs for t in (p.lora_A, p.lora_B)]
        flops = sum(_lora_cost(m, k, n, base)[0] for k, n in ((h, f), (h, f), (f, h)))
        tag = f"M{m} D{h} F{f}"
        yield row(
            b, "swiglu_mlp", f"{base}-triton", tag, train_step(lambda: swiglu_mlp(x, *projs), inputs, dy), flops, 0
        )
        yield row(
            b,
            "swiglu_mlp",
            f"{base}-reference",
            tag,
            train_step(lambda: swiglu_mlp_reference(x, *projs), inputs, dy),
            flops,
            0,
        )


def bench_ce(b, cfg):
    dev, dt = b.device, b.dtype
    m, h, v = cfg["tokens"][0] * cfg["tokens"][1], cfg["hidden"], cfg["vocab"]
    hidden = torch.randn(m, h, device=dev, dtype=dt, requires_grad=True)
    head = torch.randn(v, h, device=dev, dtype=dt) / h**0.5
    labels = torch.randint(0, v, (m,), device=dev)
    flops, nbytes = 4 * m * v * h, 4 * m * v * 2 + 2 * v * h * 2
    tag = f"T{m} H{h} V{v}"

    def step(fn):
        return lambda: torch.autograd.grad(fn(), [hidden])

    yield row(
        b, "ce", "triton-chunked", tag, step(lambda: fused_linear_cross_entropy(hidden, head, labels)), flops, nbytes
    )
    yield row(
        b,
        "ce",
        "reference-full-logits",
        tag,
        step(lambda: fused_linear_cross_entropy_reference(hidden, head, labels)),
        flops,
        nbytes,
    )
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        yield row(b, "ce", "liger-flce", tag, step(lambda: loss(head, hidden, labels)), flops, nbytes)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001
        yield peer_error("ce", "liger-flce", tag, e)


BENCHES = {
    "nf4_dequant": bench_nf4_dequant,
    "lora_linear": bench_lora_linear,
    "rmsnorm": bench_rmsnorm,
    "rope": bench_rope,
    "swiglu_mlp": bench_swiglu_mlp,
    "ce": bench_ce,
}


# --- driver --------------------------------------------------------------------------------------


def _card(device: str) -> str:
    if device == "cpu":
        return "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--ops", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (reference paths): checks the script")
    ap.add_argument("--out", default=None, help="JSONL path (default benchmarks/results/<date>-<card>-kernels.jsonl)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (or --smoke)")
        return 1
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(BENCHES)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {tuple(BENCHES)}")
    models = {"smoke": SMOKE} if args.smoke else MODELS if args.model == "all" else {args.model: MODELS[args.model]}
    torch.manual_seed(0)
    b = Bench(args.warmup, args.iters, *(("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)))
    b.measure_floors()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-{_card(b.device)}-kernels.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        card=torch.cuda.get_device_name() if b.device == "cuda" else "cpu",
        torch=torch.__version__,
        triton=_runtime.TRITON_VERSION,
        commit=_commit(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        gemm_tflops=round(b.flops_per_s / 1e12, 1),
        copy_gbps=round(b.bytes_per_s / 1e9, 1),
    )
    print(
        f"{'op':<12} {'variant':<30} {'shape':<32} {'ms':>9} {'floor':>8} {'x floor':>8} {'TFLOP/s':>8} {'peak MB':>9}"
    )
    with out.open("a") as fh:
        for model, cfg in models.items():
            for op in ops:
                for r in BENCHES[op](b, cfg):
                    r = dict(model=model, **r, **meta)
                    fh.write(json.dumps(r) + "\n")
                    fh.flush()
                    _print(r)
                if b.device == "cuda":
                    torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


def _print(r: dict) -> None:
    if "error" in r:
        print(f"{r['op']:<12} {r['variant']:<30} {r['shape']:<32} error: {r['error']}")
        return
    print(
        f"{r['op']:<12} {r['variant']:<30} {r['shape']:<32} {r['ms']:>9.3f} {r['floor_ms']:>8.3f} "
        f"{r['x_floor']:>8.2f} {r['tflops']:>8.1f} {r['peak_mb']:>9.1f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())

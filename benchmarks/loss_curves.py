"""Loss curves of the fast path against the reference path: same model, data, seed and steps.

    python benchmarks/loss_curves.py [--steps 50] [--out benchmarks/results]

Trains the built-in tiny Llama (NF4 base, LoRA r8 on the seven projections, the bundled sample rows, packed
into fixed-length rows) with `lorafuse.job.run` once per variant and compares the per-step training losses:

    reference-fp32   PyTorch reference path in fp32           the yardstick of rounding noise
    reference-bf16   PyTorch reference path in bf16
    fast-bf16        fused Triton kernels, eager launches     (CUDA only)
    fast-bf16-graphs fused Triton kernels + CUDA graphs       (CUDA only)
    fast-fp8-graphs  the same with train.fp8: the forward's, the recompute's and the backward's dX base GEMMs in FP8
                     (compute capability 8.9+ only; opt-in, so it is measured against the bf16 noise, not held to it)

"bf16 noise" is how far the bf16 reference drifts from the fp32 one; each fast variant's distance from the
bf16 reference is reported next to it, as max and mean |difference| over the steps. A table is printed and
one JSON line per variant is appended to <out>/<date>-<card>-loss-curves.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lorafuse.config import load_config  # noqa: E402
from lorafuse.job import run  # noqa: E402

VARIANTS = {  # name: (fast_path, compute dtype, cuda_graphs, train.fp8)
    "reference-fp32": ("off", "float32", "off", False),
    "reference-bf16": ("off", "bfloat16", "off", False),
    "fast-bf16": ("on", "bfloat16", "off", False),
    "fast-bf16-graphs": ("on", "bfloat16", "auto", False),
    "fast-fp8-graphs": ("on", "bfloat16", "auto", True),
}


def _runs(name: str, device: str) -> bool:
    fast, _, _, fp8 = VARIANTS[name]
    if fast == "off":
        return True
    if device != "cuda":
        return False
    return not fp8 or torch.cuda.get_device_capability() >= (8, 9)


def train_losses(name: str, steps: int, device: str, seed: int) -> tuple[list[float], list[str]]:
    fast, dtype, graphs, fp8 = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"lorafuse-curve-{name}-") as out:
        cfg = load_config(
            None,
            [
                f"output.dir={out}",
                "model.quant=nf4",
                f"model.compute_dtype={dtype}",
                "lora.dropout=0",
                "lora.modules_to_save=[]",
                "data.packing=true",
                "data.max_length=256",
                f"train.max_steps={steps}",
                "train.log_every=1",
                f"train.eval_every={steps}",
                f"train.save_every={steps}",
                f"train.fast_path={fast}",
                f"train.cuda_graphs={graphs}",
                f"train.device={device}",
                f"train.seed={seed}",
                "train.optimizer=adamw",
                f"train.fp8={str(bool(fp8)).lower()}",
                "train.gradient_checkpointing=true",
            ],
        )
        result = run(cfg, resume=None)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None and "step" in r and "eval_loss" not in r]
    return losses[:steps], list(getattr(result, "notes", []) or [])


def compare(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"max_abs": max(d), "mean_abs": sum(d) / len(d), "steps": len(d)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n for n in VARIANTS if _runs(n, device)]
    curves = {}
    for name in names:
        curves[name], _ = train_losses(name, args.steps, device, args.seed)
    ref, noise = curves["reference-bf16"], compare(curves["reference-bf16"], curves["reference-fp32"])
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{args.steps} steps on {card}; per-step training loss")
    print(f"{'step':>4} " + " ".join(f"{n:>17}" for n in names))
    for i in range(len(ref)):
        print(f"{i + 1:>4} " + " ".join(f"{curves[n][i]:>17.5f}" for n in names))
    print(f"\nbf16 noise (reference-bf16 vs reference-fp32): max {noise['max_abs']:.4f}, mean {noise['mean_abs']:.4f}")
    rows = []
    for name in names:
        vs = compare(curves[name], ref)
        if name.startswith("fast"):
            print(
                f"{name} vs reference-bf16: max {vs['max_abs']:.4f}, mean {vs['mean_abs']:.4f} "
                f"({vs['max_abs'] / max(noise['max_abs'], 1e-12):.2f}x the bf16 noise's max)"
            )
        rows.append(
            {
                "date": dt.date.today().isoformat(),
                "card": card,
                "variant": name,
                "steps": args.steps,
                "losses": curves[name],
                "vs_reference_bf16": vs,
                "bf16_noise": noise,
            }
        )
    out = (
        Path(args.out) / f"{dt.date.today().isoformat()}-{card.lower().replace('nvidia ', '').replace(' ', '-')}"
        "-loss-curves.jsonl"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far train.fp8 moves the LoRA gradients of a deep model, against an fp32 reference and next to bf16's own error.

    python benchmarks/fp8_grads.py --out OUT [--shape llama2-7b] [--batch 4] [--seq 512] [--layers N] [--init-range S]

One random-init NF4 model of the shape (LoRA r16/alpha32 on the seven projections, B drawn too so that every
gradient and the adapters' share of dX are non-zero), one batch of random tokens, one forward + backward with
gradient checkpointing, in these modes:

    fp32          the PyTorch reference path in fp32 (a second model: the same NF4 codes, the same adapters)
    bf16          the fused kernels in bf16 (train.fp8 off)
    fp8           train.fp8: the forward's, the recompute's and the backward's dX = dY W base GEMMs in FP8

For each mode and each of the first, middle and last layers: ||g - g_fp32|| / ||g_fp32|| over that layer's LoRA
gradients (A and B of the seven projections). The deep layers' error is the question: the FP8 backward puts its
rounding into dX, which every layer below sees. Prints a table and appends JSON lines to OUT/fp8_grads.jsonl.
A random-init model is no trained one: at the default init the 7B's forward amplifies rounding (bf16 alone moves its
LoRA gradients by ~12%, benchmarks/NOTES.md); --layers and --init-range show how that depends on depth and scale.
--device cpu runs the fp32 and bf16 modes only (a smoke run of the script; FP8 needs an FP8 GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROJ7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape, device: str):
    """(model, ref): the bf16 model and its fp32 copy on the reference path: the same NF4 codes and adapters, every
    float tensor in fp32 and each NF4 weight decoded to fp32 (checkpointing on, as a run has it)."""
    import lorafuse
    from lorafuse import accel
    from lorafuse.model.random_init import random_nf4_model
    from lorafuse.options import Options

    model = random_nf4_model(shape, device, compute_dtype=torch.bfloat16, seed=0, quant="nf4")
    torch.manual_seed(0)
    lorafuse.apply_lora(model, r=16, alpha=32, dropout=0.0, targets=PROJ7)
    g = torch.Generator().manual_seed(1)
    for n, p in lora_params(model).items():  # B = 0 at init would leave A's gradient and dX's LoRA share at 0
        if "lora_B" in n:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))
    ref = copy.deepcopy(model).float()
    for m in ref.modules():
        if hasattr(m, "_compute_dtype"):
            m._compute_dtype = torch.float32
    accel.prepare(ref, Options(fast_path="off"), note=lambda _: None)
    return model, ref


def prepared(model, fp8: bool, device: str):
    """The model as a run with these settings prepares it (the fast path on CUDA; train.fp8)."""
    from lorafuse import accel
    from lorafuse.options import KernelOptions, Options

    fast = "on" if device == "cuda" else "off"
    return accel.prepare(model, Options(fast_path=fast, kernel=KernelOptions(fp8=fp8)), note=lambda _: None)


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def grads(model, batch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from lorafuse.accel import accel_state
    from lorafuse.training.loss import lm_loss_sum

    state = accel_state(model)
    for p in model.parameters():
        p.grad = None
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = lm_loss_sum(model, batch, state.head, state.fused_loss) / batch["labels"][:, 1:].numel()
    loss.backward()
    return {n: p.grad.detach().double().cpu() for n, p in lora_params(model).items()}


def layer_errors(got: dict, ref: dict, layers: list[int]) -> dict[int, float]:
    out = {}
    for i in layers:
        names = [n for n in ref if f".layers.{i}." in n]
        diff = sum(float((got[n] - ref[n]).norm() ** 2) for n in names) ** 0.5
        norm = sum(float(ref[n].norm() ** 2) for n in names) ** 0.5
        out[i] = diff / norm
    return out


def _parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    ap.add_argument(
        "--init-range",
        type=float,
        default=0.0,
        help="the weights' init std (0: the shape's initializer_range, 0.02 for Llama)",
    )
    return ap.parse_args()


def _config(args):
    """The shape's config.json, cut to --layers and initialised at --init-range when given."""
    from lorafuse.model.random_init import resolve_config

    config = resolve_config(args.shape)
    if args.layers:
        config.num_hidden_layers = args.layers
    if args.init_range:
        config.initializer_range = args.init_range
    return config


def _mode_rows(args, config, model, batch, ref: dict, layers: list[int]) -> list[dict]:
    """One row per mode the device runs (bf16; FP8 on compute capability 8.9+): each chosen layer's error."""
    from lorafuse import accel

    cuda = args.device == "cuda"
    modes = {"bf16": False}
    if cuda and torch.cuda.get_device_capability() >= (8, 9):
        modes["fp8"] = True
    rows = []
    for mode, on in modes.items():
        prepared(model, on, args.device)
        try:
            errs = layer_errors(grads(model, batch, torch.bfloat16), ref, layers)
            rows.append(
                {
                    "mode": mode,
                    "shape": args.shape,
                    "layers": model.config.num_hidden_layers,
                    "init_range": config.initializer_range,
                    "batch": args.batch,
                    "seq": args.seq,
                    "rel_err": {str(k): v for k, v in errs.items()},
                    "card": torch.cuda.get_device_name() if cuda else "cpu",
                }
            )
        finally:
            accel.restore(model)
    return rows


def main() -> None:
    args = _parse()
    os.makedirs(args.out, exist_ok=True)
    config = _config(args)
    model, ref_model = build(config, args.device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    ref = grads(ref_model, batch, torch.float32)
    del ref_model
    layers_n = model.config.num_hidden_layers
    layers = sorted({0, layers_n // 2, layers_n - 1})
    rows = _mode_rows(args, config, model, batch, ref, layers)
    with open(os.path.join(args.out, "fp8_grads.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{args.shape}, {layers_n} layers, init std {config.initializer_range}, {args.batch} x {args.seq}")
    print("mode | " + " | ".join(f"layer {i}" for i in layers) + "   (||g - g_fp32|| / ||g_fp32||, LoRA A and B)")
    for r in rows:
        print(f"{r['mode']} | " + " | ".join(f"{r['rel_err'][str(i)]:.4f}" for i in layers))


if __name__ == "__main__":
    main()

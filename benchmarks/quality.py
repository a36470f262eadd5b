"""Fine-tuning quality: exact-match accuracy of full fine-tuning, LoRA and QLoRA (lorafuse, its fast path and FP8,
and the seed's transformers + peft + bitsandbytes stack) on a task the base never saw, with the template's token
rows as pretraining left them and zeroed as real bases ship them.

    python benchmarks/quality.py                  # the GPU grid (one H100: see "GPU time" below)
    python benchmarks/quality.py --smoke          # a tiny version of everything that runs here, on a CPU
    python benchmarks/quality.py --stand-in --device cpu   # a smaller base for the grid's questions on a CPU

1. Pretrain a small Llama from scratch on synthetic string tasks (benchmarks/quality_data.py: copy, reverse,
   rotate, shift, repeat, interleave; nothing that orders or compares), and save it twice: as pretrained, and
   with the rows of the chat template's `<|im_start|>`/`<|im_end|>` zeroed in the embedding and the head.
2. Fine-tune each base on the held-out task (sort 6 digits, in the ChatML template) with every method at each
   learning rate of its grid, the same steps, batch, schedule and LoRA settings (the seed's: r=16, alpha=32,
   dropout 0.05, the seven projections; AdamW):
     full            every weight (a plain loop; fp32 masters, bf16 autocast on CUDA)
     lora, qlora     lorafuse on a 16-bit / NF4 base, reference path (train.fast_path=off)
     qlora+fast      lorafuse's fused kernels and CUDA graphs (CUDA)
     qlora+fast+fp8  the same with train.fp8 (CUDA, compute capability 8.9+)
     seed lora, seed qlora   transformers + peft (+ bitsandbytes 4-bit, CUDA), the plain loop
     full projections   the adapters' seven matrices trained in full, the tables and norms frozen: what the rank
                        costs, apart from what the frozen tables cost
   lorafuse runs with its defaults for token rows: on the zeroed base it finds the two rows and trains them.
   Questions beside the grid: --rank, --variant (rsLoRA, DoRA, PiSSA's start), --modules-to-save with --modules-lr
   (tables trained whole at their own rate, by the adapters and by full fine-tuning), --token-rows-lr (the token
   rows lorafuse trains, at their own rate), --loraplus-ratio.
3. Score each fine-tuned model on held-out rows (benchmarks/quality_train.py: greedy, exact answer + <|im_end|>),
   and its held-out answer loss (nats per answer token), a continuous measure that moves less between seeds;
   the report prints each method's lowest mean loss over its grid below the accuracy table.
   With --seeds 0,1,2 every run is repeated per seed (its own rows, adapter init and batch order); a method's
   score is its best mean accuracy over its LR grid, with the range over the seeds, and the table gives it
   relative to full fine-tuning's best mean on the same base. One seed decides little where exact match sits
   between 5% and 90% (benchmarks/NOTES.md): use several there. One JSON line per run (written as it finishes) and
   per method's best go to <out>/<date>-<card>-quality.jsonl; `lorafuse bench --table` reads the latest file's
   "best" rows.
4. Side by side: the model is tiny, so one process leaves the GPU mostly idle. After one process has pretrained
   into --base B, several can share the card, each with its own --seeds and --bases and one --tag T; then
   `python benchmarks/quality.py --report T` prints the table over all of their rows (benchmarks/reproduce.sh
   quality does this).

GPU time (one H100 80GB): pretraining 3000 steps of 64 x 128 tokens on a 4-layer, 256-wide Llama (3.4M
parameters) takes about 210 s; keep it with --base DIR and later runs skip it. A fine-tuning run of 300 steps of 16
rows takes 2-3 s replayed from CUDA graphs, 5-6 s for full fine-tuning's plain loop, 9-18 s for lorafuse's reference
path and peft, plus 1-2 s to load, evaluate and save, and about a minute of Triton compiling once per process. The
whole grid at 6 digits with --lrs 1e-3,3e-3 (7 methods x 2 rates x 2 bases) took 494 s including the pretraining.
Fewer: --lrs, --methods, --bases, --steps. Sorting 6, 8 or 10 digits in 300 steps is learnt by every method (no
separation); at 10 digits and 100-200 steps the methods differ but single seeds scatter by 20 points or more, so
give such settings several --seeds. benchmarks/NOTES.md has every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from quality_args import parse_args  # noqa: E402
from quality_data import build_tokenizer, sort_rows  # noqa: E402
from quality_report import append_rows, best_rows, readme_row, report, results_file, run_meta, table  # noqa: E402
from quality_train import (  # noqa: E402
    answer_scores,
    build_base,
    encode,
    exact_match,
    finetune,
    pretrain,
    save_bases,
)

from lorafuse.training.optim import param_groups  # noqa: E402

PROJ7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
METHODS = {  # name: (stack, settings)
    "full": ("torch", {}),
    "full projections": ("torch", {"only": PROJ7}),  # the adapters' seven matrices in full: embeddings, norms frozen
    "lora": ("lorafuse", {"quant": "none", "fast_path": "off"}),
    "qlora": ("lorafuse", {"quant": "nf4", "fast_path": "off"}),
    "qlora+fast": ("lorafuse", {"quant": "nf4", "fast_path": "on"}),
    "qlora+fast+fp8": ("lorafuse", {"quant": "nf4", "fast_path": "on", "fp8": True}),
    "seed lora": ("peft", {"quant": "none"}),
    "seed qlora": ("peft", {"quant": "nf4"}),
}
# The grids of the README's table (sort 10 digits, 200 steps; benchmarks/NOTES.md): full fine-tuning's best rate is
# 3e-4 on both bases, with or without its tables at their own rate; the adapters' best is 5e-3 with the tables frozen
# (the grid's top: 1e-2 diverged for every adapter on an earlier base) and 2e-3 with the tables trained whole.
LRS = {"full": [1e-4, 3e-4, 1e-3], "adapter": [1e-3, 2e-3, 5e-3]}
SIZES = {
    "gpu": dict(hidden=256, intermediate=768, layers=4, heads=4),
    "stand-in": dict(hidden=128, intermediate=384, layers=4, heads=4),
    "smoke": dict(hidden=64, intermediate=128, layers=2, heads=2),
}
PLAN = {  # pretrain steps, batch, tokens; fine-tune steps, batch; held-out rows
    "gpu": dict(pre_steps=3000, pre_batch=64, pre_seq=128, steps=300, batch=16, eval_rows=300, length=6),
    "stand-in": dict(pre_steps=600, pre_batch=16, pre_seq=128, steps=300, batch=16, eval_rows=200, length=6),
    "smoke": dict(pre_steps=20, pre_batch=8, pre_seq=64, steps=4, batch=4, eval_rows=16, length=6),
}


def blocker(method: str, device: torch.device, variant: str = "plain") -> str:
    """Why `method` cannot run here ("" when it can)."""
    stack, s = METHODS[method]
    if variant == "pissa" and stack == "lorafuse":
        return "PiSSA's start (--variant pissa) is peft's; lorafuse has no such lora.init"
    if s.get("fast_path") == "on" and device.type != "cuda":
        return "lorafuse's fused kernels need CUDA"
    if s.get("fp8"):
        from lorafuse.plan.policy import FP8_MIN_CAPABILITY

        if torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
            return "train.fp8 needs compute capability 8.9+"
    if stack == "peft":
        for module in ("peft", "transformers") + (("bitsandbytes",) if s["quant"] == "nf4" else ()):
            try:
                __import__(module)
            except Exception as exc:  # an import error of any kind: the peer is unavailable here
                return f"{module} does not import ({type(exc).__name__})"
        if s["quant"] == "nf4" and device.type != "cuda":
            return "bitsandbytes 4-bit (the seed's QLoRA) needs CUDA"
    return ""


def run_lorafuse(settings: dict, base: Path, data: Path, lr: float, plan: dict, device, seed: int, work: Path):
    """Train with `lorafuse train`'s job on `base`, then load base + adapter as a user would: (the model, training
    seconds, the adapter's trainable_token_indices)."""
    from rich.console import Console

    from lorafuse.artifacts.adapter_load import load_adapter
    from lorafuse.config import validate_config
    from lorafuse.job import run
    from lorafuse.model.load import load_model

    cfg = validate_config(
        {
            "model": {"path": str(base), "quant": settings["quant"]},
            "lora": {
                **_lora(plan),
                "targets": PROJ7,
                "token_row_init": plan.get("token_row_init", "sample"),
                "rslora": plan.get("variant") == "rslora",
                "dora": plan.get("variant") == "dora",
                "modules_to_save": plan.get("modules_to_save"),
            },
            "data": {
                "path": str(data),
                "format": "messages",
                "max_length": plan["max_length"],
                "cache_dir": str(data.parent / "cache"),
            },
            "train": {
                "max_steps": plan["steps"],
                "micro_batch_size": plan["batch"],
                "grad_accum": 1,
                "lr": lr,
                "warmup_steps": 0.03,
                "optimizer": "adamw",
                "gradient_checkpointing": False,
                "fast_path": settings["fast_path"],
                "fp8": settings.get("fp8", False),
                "loraplus_lr_ratio": plan.get("loraplus", 1.0),
                "modules_to_save_lr": plan.get("modules_lr") if plan.get("modules_to_save") else None,
                "token_rows_lr": plan.get("token_rows_lr"),
                "device": device.type,
                "seed": seed,
                "log_every": plan["steps"],
            },
            "output": {"dir": str(work)},
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own report (trainable-params line, progress)
        result = run(cfg, resume=None, console=Console(file=io.StringIO()))
    model, _ = load_model(str(base), quant=settings["quant"], compute_dtype="auto", device=device)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    return load_adapter(model, result.adapter_dir), result.wall_s, config["trainable_token_indices"]


def run_peer(stack: str, settings: dict, base: Path, encoded, lr: float, plan: dict, device, seed: int):
    """Full fine-tuning (stack "torch") or the seed's peft stack, in the plain loop; the trained model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"dtype": torch.float32 if stack == "torch" or device.type != "cuda" else torch.bfloat16}
    if settings.get("quant") == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    if settings.get("quant") != "nf4":
        model.to(device)
    for name, p in model.named_parameters() if settings.get("only") else ():
        p.requires_grad_(any(f".{m}." in name for m in settings["only"]))
    if stack == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if settings["quant"] == "nf4":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = _lora(plan)
        variant = plan.get("variant", "plain")
        config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=PROJ7,
            use_rslora=variant == "rslora",
            use_dora=variant == "dora",
            init_lora_weights="pissa" if variant == "pissa" else True,
            modules_to_save=plan.get("modules_to_save"),
        )
        model = get_peft_model(model, config)
    # the tables at --modules-lr: peft's trained copies of --modules-to-save, or those modules in full fine-tuning
    tables = plan.get("modules_to_save") or []
    if stack == "peft":
        whole = [n for n, _ in model.named_modules() if n.endswith("modules_to_save.default")]
    else:
        whole = [n for n, _ in model.named_modules() if any(n == m or n.endswith(f".{m}") for m in tables)]
    scale = (plan.get("modules_lr") or lr) / lr
    params = [p for p in model.parameters() if p.requires_grad]
    params = param_groups(model, params, plan.get("loraplus", 1.0), scale if whole else 1.0, whole)
    seconds = finetune(model, params, encoded, lr, plan["steps"], plan["batch"], device, seed)
    return model, seconds


def _lora(plan: dict) -> dict:
    """The adapters' settings: the seed's, at --rank r with alpha 2r when given."""
    rank = plan.get("rank") or LORA["r"]
    return {**LORA, "r": rank, "alpha": 2 * rank}


def one_run(method, base, zeroed, lr, ctx) -> dict:
    stack, settings = METHODS[method]
    row = {"kind": "run", "method": method, "stack": stack, "zeroed": zeroed, "lr": lr, **ctx["meta"]}
    why = blocker(method, ctx["device"], ctx["plan"].get("variant", "plain"))
    if why:
        return {**row, "status": "unavailable", "reason": why, "accuracy": None}
    t0 = time.perf_counter()
    try:
        if stack == "lorafuse":
            with tempfile.TemporaryDirectory(prefix="lorafuse-quality-") as work:
                model, train_s, row["token_rows"] = run_lorafuse(
                    settings, base, ctx["data"], lr, ctx["plan"], ctx["device"], ctx["seed"], Path(work)
                )
        else:
            model, train_s = run_peer(stack, settings, base, ctx["train"], lr, ctx["plan"], ctx["device"], ctx["seed"])
        accuracy = exact_match(model, ctx["eval"], ctx["device"])
        row["adapter_params"] = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        row["token_accuracy"], row["answer_loss"] = answer_scores(model, ctx["eval"], ctx["device"])
    except Exception as exc:  # one failed run is a row with its reason; the grid goes on
        traceback.print_exc()
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300], "accuracy": None}
    return {
        **row,
        "status": "ok",
        "accuracy": accuracy,
        "train_s": round(train_s, 2),
        "total_s": time.perf_counter() - t0,
    }


def _lr_grid(method: str, args) -> list[float]:
    """--lrs, else the method kind's grid; a smoke run without --lrs takes the grid's middle rate only."""
    grid = (
        [float(x) for x in args.lrs.split(",")]
        if args.lrs
        else LRS["full" if METHODS[method][0] == "torch" else "adapter"]
    )
    return grid[1:2] if args.smoke and not args.lrs else grid


def _runs(args, bases: dict, ctx: dict, out: Path) -> list[dict]:
    """Every method at each rate of its grid on the --bases (as pretrained, then zeroed), printed and appended to
    `out` as they finish (a run cut short keeps the rows it made)."""
    rows = []
    for zeroed in [variant == "zeroed" for variant in args.bases]:
        for method in args.methods:
            for lr in _lr_grid(method, args):
                row = one_run(method, bases["zeroed" if zeroed else "plain"], zeroed, lr, ctx)
                rows.append(row)
                append_rows(out, [row])
                acc = "n/a" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
                if row["status"] == "ok":
                    acc += f" (tokens {100 * row['token_accuracy']:.1f}%)"
                took = f"({row['total_s']:.0f} s)" if row["status"] == "ok" else row.get("reason") or ""
                print(f"  {method:<16} zeroed={zeroed!s:<5} lr {lr:.0e}: {acc} {took}", flush=True)
    return rows


def _bases(args, kind: str, plan: dict, tokenizer, device: torch.device, folder: Path) -> dict[str, Path]:
    """The pretrained bases ("plain", "zeroed") in `folder`: reused when a --base folder already holds them (its
    pretraining steps are recorded beside them), else pretrained here and saved there."""
    record = folder / "pretraining.json"
    if record.is_file():
        plan["pre_steps"] = json.loads(record.read_text())["steps"]
        print(f"bases from {folder} ({plan['pre_steps']} pretraining steps)", flush=True)
        return {variant: folder / variant for variant in ("plain", "zeroed")}
    t0 = time.perf_counter()
    model = build_base(SIZES[kind], tokenizer, args.seed)
    losses = pretrain(model, tokenizer, plan["pre_steps"], plan["pre_batch"], plan["pre_seq"], 1e-3, device, args.seed)
    print(f"pretrained in {time.perf_counter() - t0:.0f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    bases = save_bases(model, tokenizer, folder, torch.bfloat16 if device.type == "cuda" else torch.float32)
    record.write_text(json.dumps({"steps": plan["pre_steps"], "loss": losses[-1], "seed": args.seed}) + "\n")
    return bases


def _seed_context(seed: int, plan: dict, tokenizer, device, meta: dict, folder: Path) -> dict:
    """One seed's held-out rows (seed + 1), training rows (seed + 2, none of them held out) as a data file and as
    encoded tensors, and the row metadata that records the seed."""
    eval_rows = sort_rows(plan["eval_rows"], seed + 1, plan["length"])
    prompts = {r["messages"][0]["content"] for r in eval_rows}
    train_rows = sort_rows(plan["steps"] * plan["batch"], seed + 2, plan["length"], prompts)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    train, held_out = encode(tokenizer, train_rows), encode(tokenizer, eval_rows)
    plan["max_length"] = train[0].shape[1] + 8  # room for the template's own tail: nothing is truncated
    meta = {**meta, "seed": seed}  # the held-out and training rows, the adapters' init and the batch order
    return dict(device=device, plan=plan, seed=seed, data=data, meta=meta, train=train, eval=held_out)


def main(argv=None) -> int:
    args = parse_args(argv, METHODS, __doc__.splitlines()[0])
    if args.report:
        return report(args.report, args.out, METHODS)
    kind = "smoke" if args.smoke else "stand-in" if args.stand_in else "gpu"
    plan, device = dict(PLAN[kind]), torch.device(args.device)
    knobs = {"steps": args.steps, "pre_steps": args.pretrain_steps, "eval_rows": args.eval_rows}
    for key, value in {**knobs, "length": args.sort_length}.items():
        plan[key] = value or plan[key]
    plan["loraplus"], plan["token_row_init"], plan["rank"] = args.loraplus_ratio, args.token_row_init, args.rank
    plan["variant"] = args.variant
    plan["modules_to_save"] = [m for m in (args.modules_to_save or "").split(",") if m] or None
    plan["modules_lr"] = args.modules_lr
    plan["token_rows_lr"] = args.token_rows_lr
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: more threads only add contention (tests/conftest.py measured 8x)
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    meta = {**run_meta(device), "task": f"sort {plan['length']} digits", "steps": plan["steps"], "batch": plan["batch"]}
    meta["size"] = kind
    meta.update(
        eval_rows=plan["eval_rows"],
        tag=args.tag,
        loraplus_lr_ratio=args.loraplus_ratio,
        token_row_init=args.token_row_init,
        lora_rank=_lora(plan)["r"],
        lora_variant=args.variant,
        modules_to_save=plan["modules_to_save"],
        modules_to_save_lr=args.modules_lr,
        token_rows_lr=args.token_rows_lr,
    )
    out = results_file(args.out, meta["card"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafuse-quality-bases-") as tmp:
        bases = _bases(args, kind, plan, tokenizer, device, Path(args.base) if args.base else Path(tmp))
        meta["pretrain_steps"] = plan["pre_steps"]
        if args.pretrain_only:
            return 0
        for seed in args.seeds:
            ctx = _seed_context(seed, plan, tokenizer, device, meta, Path(tmp) / f"seed-{seed}")
            rows += _runs(args, bases, ctx, out)
    best = best_rows(rows, METHODS)
    print("\n" + table(best, METHODS, plan, meta["card"], args.seeds))
    if args.tag:  # one part of a grid: its best rows come from --report over every part
        print(f"\n{len(rows)} run rows appended to {out}; {time.perf_counter() - t0:.0f} s in all")
        return 0 if any(r["status"] == "ok" for r in rows) else 1
    print("\n" + readme_row(best))
    append_rows(out, best)
    print(f"\n{len(rows) + len(best)} rows appended to {out}; {time.perf_counter() - t0:.0f} s in all")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`lorafuse bench`: end-to-end training steps of lorafuse and its peers on one card, each in its own process.

    lorafuse bench --shape llama2-7b --batch 4 --seq 512 --stacks lorafuse,hf,unsloth --methods qlora,lora
    lorafuse bench --shape llama2-7b --table          # full / LoRA / QLoRA beside the seed's summary table
    lorafuse bench --shape tiny --device cpu           # smoke test (peers that need CUDA: unavailable)
    lorafuse bench --shape llama2-7b --objective dpo --pairs 4 --seq 512 --methods qlora   # DPO steps, pairs/s
    lorafuse bench --shape llama2-7b --stacks lorafuse --methods qlora --job   # + the `lorafuse train` job's step

Flow: (1) a child process (bench_child.py) builds a random-init model of the shape (lorafuse.plan.shapes) directly
on the device, saves it with a tokenizer as a local checkpoint folder (cached under --model-dir) and reports the
card and library versions; (2) for every (stack, method) a runner `benchmarks/peers/<stack>_stack.py`
runs in a fresh process (see benchmarks/peers/bench_common.py for the timing method: warmup, then the
median of --steps CUDA-event-timed steps on random tokens, torch.cuda.max_memory_allocated); (3) the
table with lorafuse/peer ratios (bench_table.py) is printed and one JSON line per run is appended to
<out>/<date>-<card>.jsonl; each lorafuse SFT run on a GPU also appends its measured peak, with the planner's
workload, to --memory-log (benchmarks/measured_memory.jsonl, which tests/plan/test_measured.py checks; the
planner models SFT steps, so DPO rows are not logged there).
--objective dpo times DPO steps instead: --pairs P preference pairs a step (2P rows of --seq tokens, the first
seq // 4 of each a prompt without loss), DPO's sigmoid loss with beta 0.1 against the reference model taken from
the same weights with the adapter switched off; lorafuse through its DPO objective, hf as TRL's DPOTrainer on
transformers + peft (+ bitsandbytes), unsloth as Unsloth's model under TRL's DPOTrainer. Rows add pairs/s.
--job adds, after each lorafuse qlora / lora run, the `lorafuse train` job itself (lorafuse.job.run) on the same
step in its own process (benchmarks/peers/lorafuse_job.py: raw-text rows of exactly --seq tokens, a config of the
harness's settings, the step times from its metrics.jsonl); its row has runner "job" (the others "harness") and
the table adds the job's step time over the harness's.
A stack that cannot run is a row "unavailable: <reason>", never a crash. The harness and the runners live in
the source checkout (benchmarks/): run `python benchmarks/bench.py ...` or `lorafuse bench ...` from a checkout.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lorafuse, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_args import JOB_METHODS, parse_args, plan_runs, prompt_tokens  # noqa: E402
from bench_child import build_in_child, run_child  # noqa: E402
from bench_table import latest_quality, render, render_seed_table  # noqa: E402

from lorafuse.plan.memory import GIB, estimate  # noqa: E402
from lorafuse.plan.shapes import PROJECTIONS, builtin_shape  # noqa: E402
from lorafuse.plan.workload import Workload  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
REQUIRED_KEYS = (
    "run",
    "card",
    "stack",
    "method",
    "runner",
    "objective",
    "shape",
    "batch",
    "seq",
    "step_s",
    "tokens_per_s",
    "peak_alloc_gib",
    "commit",
    "torch",
    "transformers",
    "status",
)
NEEDS_CUDA = {
    ("hf", "qlora"): "bitsandbytes QLoRA (the seed's recipe) needs CUDA",
    ("unsloth", "qlora"): "Unsloth needs CUDA",
    ("unsloth", "lora"): "Unsloth needs CUDA",
}
UNSUPPORTED = {
    ("lorafuse", "full"): "lorafuse trains adapters (qlora, lora), not full fine-tuning",
    ("unsloth", "full"): "this runner benchmarks Unsloth's qlora and lora only",
}
DPO_ADAPTERS_ONLY = "the DPO benchmark trains adapters (qlora, lora): its reference is the adapter switched off"


def _run_settings(args, stack: str, method: str, runner: str = "harness") -> dict:
    """What a (stack, method) run is, as its runner's spec and its JSON row both carry it; runner "job": the
    `lorafuse train` job on the same step (--job), "harness": the step the harness builds and times."""
    return {
        "stack": stack,
        "method": method,
        "runner": runner,
        "objective": args.objective,
        "pairs": args.pairs,
        "prompt_tokens": prompt_tokens(args.seq) if args.objective == "dpo" else None,
        "shared_prompt": args.shared_prompt if args.objective == "dpo" and stack == "lorafuse" else None,
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "dtype": args.dtype,
        "r": args.r,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "random_init": args.random_init,
        "budget_gib": args.budget_gib,
        **_memory_settings(args, stack),
    }


def _spec(args, stack: str, method: str, folder: Path, runner: str = "harness") -> dict:
    """The runner's spec (benchmarks/peers/<stack>_stack.py, or lorafuse_job.py, reads it)."""
    return {
        **_run_settings(args, stack, method, runner),
        "folder": str(folder),
        "vocab_size": builtin_shape(args.shape).vocab_size,
        "optimizer": args.optimizer,
        "full_optimizer": args.full_optimizer,
        "fast_path": "off" if args.no_fast_path else "auto",
        "seed": args.seed,
        "cuda_graphs": not args.no_graphs,
        "profile_dir": args.profile,
    }


def _gc(args) -> bool | str:
    """The runners' (and the JSON rows') checkpointing value: True, False or "offload"."""
    return "offload" if args.offload else not args.no_gc


def _memory_settings(args, stack: str) -> dict:
    """lorafuse's own memory settings for its runs; the peers run with checkpointing as asked and their defaults
    for the rest (bench_args: --offload, --host-* and --keep-layers are lorafuse's, recorded on its rows only)."""
    if stack != "lorafuse":
        return {
            "gc": not args.no_gc,
            "embeddings_on_host": False,
            "head_on_host": False,
            "uncheckpointed_layers": 0,
            "dequant_cap_mib": 0,
            "fp8": False,
            "experimental": [],
        }
    return {
        "gc": _gc(args),
        "embeddings_on_host": args.host_embeddings,
        "head_on_host": args.host_head,
        "uncheckpointed_layers": args.keep_layers,
        "dequant_cap_mib": args.dequant_cap_mib,
        "fp8": args.fp8,
        "experimental": sorted(set(args.experimental)),
    }


def _workload(args, method: str, kernels: str = "reference", loss: str = "chunked", graphs: bool = False) -> Workload:
    full = method == "full"
    return Workload(
        builtin_shape(args.shape),
        method=method,
        micro_batch=args.batch,
        seq=args.seq,
        grad_accum=1,
        r=args.r,
        targets=PROJECTIONS,
        dropout=args.dropout,
        compute_bytes=4 if args.dtype == "float32" else 2,
        optimizer=args.full_optimizer if full else args.optimizer,
        checkpointing="off" if args.no_gc else "offload" if args.offload else "on",
        loss=loss,
        kernels=kernels,
        padded=False,
        autocast=args.device == "cuda",
        embeddings_on_host=args.host_embeddings and method != "full",
        head_on_host=args.host_head and method != "full",
        cuda_graphs=graphs,
        uncheckpointed=args.keep_layers if method != "full" else 0,
        dequant_cap_mib=args.dequant_cap_mib,
        fp8=args.fp8 and method != "full",
    )


def plan_runners(args) -> list[tuple[str, str, str]]:
    """(stack, method, runner) of each run: runner "harness" for every planned run, and with --job a "job" run
    right after each lorafuse qlora / lora run."""
    out = []
    for stack, method in plan_runs(args):
        out.append((stack, method, "harness"))
        if args.job and stack == "lorafuse" and method in JOB_METHODS:
            out.append((stack, method, "job"))
    return out


def _script(stack: str, runner: str = "harness") -> Path:
    """The runner script of a run: peers/<stack>_stack.py, or peers/lorafuse_job.py for the job (--job)."""
    return PEERS / ("lorafuse_job.py" if runner == "job" else f"{stack}_stack.py")


def _precheck(args, stack: str, method: str, probe: dict, runner: str = "harness") -> str | None:
    if (stack, method) in UNSUPPORTED:
        return "unavailable: " + UNSUPPORTED[stack, method]
    if args.objective == "dpo" and method == "full":
        return "unavailable: " + DPO_ADAPTERS_ONLY
    if args.device != "cuda" and (stack, method) in NEEDS_CUDA:
        return "unavailable: " + NEEDS_CUDA[stack, method]
    if not _script(stack, runner).is_file():
        return f"unavailable: {PEERS} not found (run lorafuse bench from a lorafuse source checkout)"
    if method == "full" and probe.get("memory_gib"):
        predicted = estimate(_workload(args, "full", loss="full")).peak / GIB
        if predicted > probe["memory_gib"]:
            return f"skipped: the planner predicts {predicted:.1f} GiB > {probe['memory_gib']:.1f} GiB on this card"
    return None


def _commit() -> tuple[str, bool | None]:
    if os.environ.get("LORAFUSE_COMMIT"):
        return os.environ["LORAFUSE_COMMIT"], None
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    if head.returncode != 0:
        return "unknown", None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def card_slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower().replace("nvidia", "")).strip("-") or "unknown"


def _row(args, run_id: str, stack: str, method: str, probe: dict, result: dict, commit, runner="harness") -> dict:
    row = {
        "run": run_id,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "card": probe.get("card", "unknown"),
        **_run_settings(args, stack, method, runner),
        "optimizer": args.full_optimizer if method == "full" else args.optimizer,
        "commit": commit[0],
        "dirty": commit[1],
        "torch": probe.get("torch"),
        "transformers": probe.get("transformers"),
        "status": "error",
        "reason": None,
        "step_s": None,
        "tokens_per_s": None,
        "pairs_per_s": None,
        "peak_alloc_gib": None,
        "peak_reserved_gib": None,
    }
    knobs = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("LORAFUSE_")
        and k != "LORAFUSE_COMMIT"
        or k == "CUBLAS_WORKSPACE_CONFIG"
        or (stack == "unsloth" and k.startswith("UNSLOTH_"))  # Unsloth's opt-in switches, e.g. its fused DPO loss
    }
    if knobs:  # A/B switches this run was made with (LORAFUSE_HEAD_STREAM=0, a cuBLAS workspace size...)
        row["env"] = knobs
    if stack == "lorafuse" and method != "full" and args.objective == "sft":  # the planner models SFT steps
        row["predicted_peak_alloc_gib"] = round(_predicted(args, method, result), 4)
    row.update(result)
    return row


def _lorafuse_workload(args, method: str, result: dict) -> Workload:
    """The planner's workload for a lorafuse run; before the run (empty result) it assumes the fast path on CUDA,
    and CUDA graphs with it unless --no-graphs."""
    fast = (result.get("fast_path") or {}).get("applied", args.device == "cuda" and not args.no_fast_path)
    loss = "fused" if result.get("fused_loss", fast) else "chunked" if result.get("chunked_loss", True) else "full"
    graphs = (result.get("cuda_graphs") or {}).get("applied", fast and not args.no_graphs)
    return _workload(args, method, kernels="fused" if fast else "reference", loss=loss, graphs=bool(graphs))


def _predicted(args, method: str, result: dict) -> float:
    return estimate(_lorafuse_workload(args, method, result)).peak_alloc / GIB


def _memory_record(args, row: dict) -> dict:
    from lorafuse.plan.measured import workload_to_record

    w = _lorafuse_workload(args, row["method"], row)
    return {
        "date": row["date"][:10],
        "card": row["card"],
        "commit": row["commit"],
        "torch": row["torch"],
        "run": row["run"],
        "stack": "lorafuse",
        "workload": workload_to_record(w),
        "measured_peak_alloc_gib": round(row["peak_alloc_gib"], 4),
        "measured_peak_reserved_gib": round(row["peak_reserved_gib"], 4),
        "predicted_peak_alloc_gib": round(estimate(w).peak_alloc / GIB, 4),
        **({"env": row["env"]} if row.get("env") else {}),
    }  # A/B switches the workload does not describe


def _append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def _run_one(args, run: tuple[str, str, str], folder: Path, probe: dict, where: str) -> dict:
    """The result of one (stack, method, runner) run from its runner's process, or why it did not run."""
    stack, method, runner = run
    skip = _precheck(args, stack, method, probe, runner)
    if skip:
        status, _, reason = skip.partition(": ")
        return {"status": status, "reason": reason}
    said = (
        f" (the planner predicts a peak of {_predicted(args, method, {}):.2f} GiB allocated)"
        if stack == "lorafuse" and args.objective == "sft"
        else ""
    )
    print(f"{where} {stack} {method}{' job' if runner == 'job' else ''}{said} ...", flush=True)
    spec = _spec(args, stack, method, folder, runner)
    result, tail = run_child([sys.executable, str(_script(stack, runner)), json.dumps(spec)], args.timeout)
    if result.get("status") == "error" and tail:
        print(tail, file=sys.stderr)
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = plan_runners(args)
    folder = Path(args.model_dir) / f"{args.shape}-{args.device}-{args.dtype}"
    print(
        f"probing the device (the {args.shape} model is generated in each runner) ..."
        if args.random_init
        else f"building / checking the {args.shape} checkpoint in {folder} ...",
        flush=True,
    )
    probe = build_in_child(args, folder)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    commit, rows = _commit(), []
    batch = f"{args.pairs} DPO pairs ({args.batch} rows)" if args.objective == "dpo" else f"batch {args.batch}"
    print(
        f"run {run_id} on {probe['card']}: {args.shape}, {batch} x {args.seq}, torch {probe['torch']}, "
        f"transformers {probe['transformers']}",
        flush=True,
    )
    for i, run in enumerate(runs, 1):
        result = _run_one(args, run, folder, probe, f"[{i}/{len(runs)}]")
        rows.append(_row(args, run_id, *run[:2], probe, result, commit, runner=run[2]))
    print(render(rows))
    if args.table:
        print("\n" + render_seed_table(rows, latest_quality(ROOT / "benchmarks" / "results")))
    out = Path(args.out) / f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}-{card_slug(probe['card'])}.jsonl"
    _append(out, rows)
    print(f"\n{len(rows)} rows appended to {out}")
    measured = [
        _memory_record(args, r)
        for r in rows
        if r["stack"] == "lorafuse"
        and r["runner"] == "harness"  # the job's peak counts its loading too
        and r["objective"] == "sft"
        and r["status"] == "ok"
        and r.get("peak_alloc_gib") is not None
    ]
    if measured and args.memory_log:
        _append(Path(args.memory_log), measured)
        print(f"{len(measured)} measured peaks appended to {args.memory_log}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":  # through lorafuse's command-line boundary: a bad option is one line and exit 2
    from lorafuse.cli import main as lorafuse_main

    raise SystemExit(lorafuse_main(["bench", *sys.argv[1:]]))

"""The timing harness every benchmark runner uses, so each stack is measured the same way.

A runner is a script run as `python benchmarks/peers/<stack>_stack.py SPEC_JSON` in its own process
(one stack's imports and monkey-patches never leak into another's). It builds its model and a step
function with `build(spec, device) -> (step, info)`, where `step(batch) -> loss` does one forward,
backward, gradient clipping (max norm 1.0, as the Trainer's default) and optimizer step. `run(build)` then:

  1. makes warmup + steps batches of random token ids in [0, vocab) (B, T), int64, on the device, labels
     = input ids, no padding (every token is real, so tokens/s = B T / step time); with spec["objective"] ==
     "dpo", P = spec["pairs"] preference pairs instead (`make_pair_batches`): B = 2P rows, and a step's stack
     may turn the common batch into its own inputs before timing (`step.prepare`);
  2. resets the CUDA peak-memory counter (the loaded weights stay counted: they are allocated);
  3. runs `warmup` steps, then `steps` timed steps, each between two CUDA events (perf_counter on CPU), with no
     host synchronisation inside the timed region other than what the stack itself does;
  4. prints one line `BENCH_RESULT {json}`: the median step time, tokens/s (and pairs/s = P / step time for dpo),
     peak allocated/reserved GiB, first/last loss (finite, or the run is an error), and the runner's `info`.

A runner whose stack cannot be imported prints `BENCH_UNAVAILABLE <reason>` and exits 0. A CUDA
out-of-memory error is a result (`status: oom`), not a crash. A runner that times something other than a step
function (peers/lorafuse_job.py: the `lorafuse train` job, which times its own steps) calls `report(work)`, which
prints its result the same way.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # lorafuse from this checkout, also where it is not installed

PROJ7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3
DPO_BETA = 0.1  # DPO's beta in every stack: TRL's DPOConfig default and lorafuse's train.beta default


def emit(kind: str, payload) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    print(f"{kind} {text}", flush=True)


def unavailable(reason: str) -> None:
    emit("BENCH_UNAVAILABLE", reason.replace("\n", " ")[:300])
    raise SystemExit(0)


def require(module: str) -> None:
    """Import `module` or report the stack unavailable (not a crash)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        unavailable(f"cannot import {module}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def dtype_of(spec: dict):
    import torch

    return getattr(torch, spec["dtype"])


def autocast(spec: dict):
    """bf16/fp16 autocast on CUDA (what the Trainer's bf16=True and lorafuse's loop do); nothing on CPU."""
    import contextlib

    import torch

    if spec["device"] == "cuda" and spec["dtype"] != "float32":
        return torch.autocast("cuda", dtype=dtype_of(spec))
    return contextlib.nullcontext()


def make_batches(spec: dict, device, n: int) -> list[dict]:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    out = []
    for _ in range(n):
        ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=gen).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def make_pair_batches(spec: dict, device, n: int) -> list[dict]:
    """n DPO micro-batches of P = spec["pairs"] pairs, as lorafuse's Batcher lays pairs out: 2P rows of T tokens,
    the P chosen rows then the P rejected rows in the same pair order; pair i's two rows share their first
    L = spec["prompt_tokens"] tokens (the prompt, labels -100) and differ in the T - L response tokens after it.
    Random ids in [0, vocab), int64, no padding. Keys: input_ids, labels (2P, T), attention_mask (all ones),
    right_padded, num_pairs P, prompt_tokens L."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(spec["seed"])
    pairs, width, prompt, vocab = spec["pairs"], spec["seq"], spec["prompt_tokens"], spec["vocab_size"]
    out = []
    for _ in range(n):
        shared = torch.randint(0, vocab, (pairs, prompt), generator=gen).repeat(2, 1)
        ids = torch.cat([shared, torch.randint(0, vocab, (2 * pairs, width - prompt), generator=gen)], 1)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append(
            {
                "input_ids": ids.to(device),
                "labels": labels.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "right_padded": True,
                "num_pairs": pairs,
                "prompt_tokens": prompt,
            }
        )
    return out


def _timed(step, batches, cuda: bool) -> tuple[list[float], list]:
    import torch

    times, losses = [], []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batches]
        for (start, end), batch in zip(events, batches):
            start.record()
            losses.append(step(batch))
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1000 for s, e in events]
    else:
        for batch in batches:
            t0 = time.perf_counter()
            losses.append(step(batch))
            times.append(time.perf_counter() - t0)
    return times, losses


def measure(spec: dict, step, device) -> dict:
    import torch

    cuda = device.type == "cuda"
    dpo = spec.get("objective") == "dpo"
    batches = (make_pair_batches if dpo else make_batches)(spec, device, spec["warmup"] + spec["steps"])
    prepare = getattr(step, "prepare", None)  # the stack's own inputs, made before timing
    batches = [prepare(b) for b in batches] if prepare else batches
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _, warm_losses = _timed(step, batches[: spec["warmup"]], cuda)
    times, losses = _timed(step, batches[spec["warmup"] :], cuda)
    losses = [float(x) for x in warm_losses + losses]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss in the benchmark steps: {losses}")
    if spec.get("profile_dir"):
        profile(spec, step, batches[-2:], cuda)
    step_s = statistics.median(times)
    return {
        "status": "ok",
        "step_s": step_s,
        "tokens_per_s": spec["batch"] * spec["seq"] / step_s,
        **({"pairs_per_s": spec["pairs"] / step_s} if dpo else {}),
        "step_times": times,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
    }


def profile(spec: dict, step, batches: list, cuda: bool) -> None:
    """Profile len(batches) more steps; write the kernel table (by device time) to <dir>/<stack>-<method>.txt."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for batch in batches:
            step(batch)
        if cuda:
            torch.cuda.synchronize()
    what = spec["method"] + ("-dpo" if spec.get("objective") == "dpo" else "")
    name = f"{spec['stack']}-{what}-{spec['shape']}-{spec['batch']}x{spec['seq']}"
    out = Path(spec["profile_dir"]) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = (
        f"{len(batches)} steps, sorted by {sort}\n"
        + events.table(sort_by=sort, row_limit=60, max_name_column_width=70)
        + "\n\nby input shape:\n"
        + prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort, row_limit=60, max_name_column_width=50, max_shapes_column_width=60
        )
    )
    if cuda:
        text += "\n\n" + kernel_timeline(prof, len(batches))
    out.with_suffix(".txt").write_text(text)


def kernel_timeline(prof, steps: int, top: int = 15) -> str:
    """Where the GPU sat idle: the kernels' span against their summed time, and the widest gaps between one
    kernel's end and the next one's start, each with the kernels on either side (one stream's view: kernels
    overlapping on a side stream count once)."""
    from torch.autograd import DeviceType

    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    if not kernels:
        return "no CUDA kernels recorded"
    busy, gaps, end, last = 0.0, [], kernels[0][0], kernels[0][2]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    span = end - kernels[0][0]
    idle = sum(g for g, _, _ in gaps)
    small = sum(g for g, _, _ in gaps if g < 10)
    lines = [
        f"kernel timeline over {steps} steps: {len(kernels)} kernels, span {span / 1e3:.1f} ms, busy "
        f"{busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms in {len(gaps)} gaps ({small / 1e3:.1f} ms in gaps under "
        f"10 us)",
        f"widest {top} gaps (us, kernel before -> kernel after):",
    ]
    for g, before, after in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {g:9.1f}  {before[:60]} -> {after[:60]}")
    return "\n".join(lines)


def _budget(spec: dict, device) -> None:
    """Cap this process's CUDA memory to spec["budget_gib"] (the headline runs: 40 GiB for a 65B shape)."""
    import torch

    if spec.get("budget_gib") and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["budget_gib"] * GIB / total), index)


def run(build) -> None:
    """Entry point of a runner script: argv[1] is the JSON spec; `build` makes the step that `measure` times."""

    def built_and_measured(spec: dict, device, info: dict) -> dict:
        step, built = build(spec, device)
        info.update(built)
        return measure(spec, step, device)

    report(built_and_measured)


def report(work) -> None:
    """Run `work(spec, device, info) -> result` on argv[1]'s JSON spec (seeded, the memory capped) and print its
    `BENCH_RESULT`, with what it put in `info`; out of memory and errors are results too."""
    spec = json.loads(sys.argv[1])
    import torch

    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    info: dict = {}
    try:
        _budget(spec, device)
        result = work(spec, device, info)
    except torch.cuda.OutOfMemoryError as exc:
        result = {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
        if device.type == "cuda":
            result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    emit("BENCH_RESULT", {**info, **result})


def clip_and_step(params, optimizer) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_loss_step(model, params, optimizer, spec: dict):
    """The peers' step: the model's own loss under autocast, backward, clip at 1.0, optimizer step."""

    def step(batch):
        with autocast(spec):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        clip_and_step(params, optimizer)
        return loss.detach()

    return step


def peer_optimizer(name: str, params):
    """The optimizer the seed's recipe names, from bitsandbytes (paged/8-bit) or torch (adamw)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=params[0].is_cuda)
    import bitsandbytes.optim as bnb_optim

    cls = {"paged_adamw_8bit": bnb_optim.PagedAdamW8bit, "adamw_8bit": bnb_optim.AdamW8bit}[name]
    return cls(params, lr=2e-4, weight_decay=0.0)

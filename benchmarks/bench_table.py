"""The benchmark harness's tables (benchmarks/bench.py): one row per (stack, method) run with lorafuse/peer ratios
(with --job, the `lorafuse train` job's row beside the harness's, and their step-time ratio),
and full / LoRA / QLoRA against full fine-tuning beside the seed's summary table (`lorafuse bench --table`), with
the accuracy column benchmarks/quality.py measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

SEED = {"full": ("28 GB+", "100%"), "lora": ("8 GB", "30%"), "qlora": ("6 GB", "42%")}  # SEED.md section 8
SEED_QUALITY = {"full": "100%", "lora": "99%", "qlora": "98%"}  # the seed's summary table, quality vs full


def _fmt(x, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)
    return f"{'-':>{width}}" if x is None else format(x, spec)


def _settings(r: dict) -> str:
    """lorafuse's non-default settings of a row, as the table shows them ("" for none)."""
    parts = [
        "offload" if r.get("gc") == "offload" else "",
        "host embedding" if r.get("embeddings_on_host") else "",
        "host head" if r.get("head_on_host") else "",
        f"{k} kept layers" if (k := r.get("uncheckpointed_layers")) else "",
        f"cap {c} MiB" if (c := r.get("dequant_cap_mib")) else "",
        "FP8" if r.get("fp8") else "",
    ]
    return ", ".join(p for p in parts if p)


def _stack(r: dict) -> str:
    """The stack column: "lorafuse job" for the `lorafuse train` job's row (--job), else the stack."""
    return f"{r['stack']} job" if r.get("runner") == "job" else r["stack"]


def render(rows: list[dict]) -> str:
    dpo = any(r.get("objective") == "dpo" for r in rows)
    speed = "pairs_per_s" if dpo else "tokens_per_s"
    pairs_col = f" {'pairs/s':>8}" if dpo else ""
    lines = [f"{'method':<7} {'stack':<12} {'step s':>8}{pairs_col} {'tokens/s':>10} {'peak GiB':>9}  status"]
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or ''}".strip()
        if r["stack"] == "lorafuse" and r["status"] == "ok" and r["device"] == "cuda":
            extra = _settings(r)
            status += (
                f" (fast path {'on' if (r.get('fast_path') or {}).get('applied') else 'off'}, "
                f"graphs {'on' if (r.get('cuda_graphs') or {}).get('applied') else 'off'}"
                f"{', ' + extra if extra else ''})"
            )
        pairs = f" {_fmt(r.get('pairs_per_s'), '8.2f')}" if dpo else ""
        lines.append(
            f"{r['method']:<7} {_stack(r):<12} {_fmt(r['step_s'], '8.3f')}{pairs} {_fmt(r['tokens_per_s'], '10,.0f')}"
            f" {_fmt(r['peak_alloc_gib'], '9.2f')}  {status}"
        )
    methods = dict.fromkeys(r["method"] for r in rows)  # in the order they ran
    ratios = [line for m in methods for line in _ratios([r for r in rows if r["method"] == m], speed)]
    head = f"ratios ({speed.replace('_per_s', '/s')}: >1 is faster; memory: <1 is smaller)"
    if dpo:
        lines.append(
            "DPO: hf = TRL's DPOTrainer on transformers + peft (+ bitsandbytes); unsloth = Unsloth's model in it"
        )
    return "\n".join(lines + ([head] + ratios if ratios else []))


def _ratios(rows: list[dict], speed: str) -> list[str]:
    """The ratio lines of one method's rows: lorafuse's rows (the harness's, then the job's) against each peer's,
    then the job's step time over the harness's (>1: the job's step is slower)."""
    out = []
    for ours in (r for r in rows if r["stack"] == "lorafuse" and r["status"] == "ok"):
        for peer in (r for r in rows if r["stack"] != "lorafuse" and r["status"] == "ok"):
            mem = (
                "" if not peer["peak_alloc_gib"] else f", memory {ours['peak_alloc_gib'] / peer['peak_alloc_gib']:.2f}x"
            )
            out.append(
                f"  {ours['method']}: {_stack(ours)} vs {peer['stack']}: speed {ours[speed] / peer[speed]:.2f}x{mem}"
            )
    ok = {r.get("runner", "harness"): r for r in rows if r["stack"] == "lorafuse" and r["status"] == "ok"}
    if "job" in ok and "harness" in ok:
        job, harness = ok["job"]["step_s"], ok["harness"]["step_s"]
        out.append(
            f"  {ok['job']['method']}: lorafuse job/harness step time {job / harness:.2f}x "
            f"({job:.3f} s / {harness:.3f} s; >1: the job's step is slower)"
        )
    return out


def latest_quality(results: Path) -> dict[str, str]:
    """{method: "99.7% / 98.0%"}: lorafuse's exact-match accuracy relative to full fine-tuning, template rows as
    pretrained / zeroed, from the newest run in the newest benchmarks/quality.py results file ({} without one)."""
    files = sorted(Path(results).glob("*-quality.jsonl"))
    best = [r for r in (json.loads(x) for x in files[-1].read_text().splitlines() if x.strip())] if files else []
    best = [r for r in best if r.get("kind") == "best"]
    if not best:
        return {}
    newest = max(r["run"] for r in best)
    out = {}
    for method in SEED:
        rel = {r["zeroed"]: r["relative_to_full"] for r in best if r["run"] == newest and r["method"] == method}
        if rel:
            out[method] = " / ".join("n/a" if rel.get(z) is None else f"{100 * rel[z]:.1f}%" for z in (False, True))
    return out


def render_seed_table(rows: list[dict], quality: dict[str, str] | None = None) -> str:
    """Memory and step time vs full fine-tuning beside the seed's table; `quality` (latest_quality) adds the
    accuracy column benchmarks/quality.py measured (as pretrained / zeroed template rows)."""
    by = {r["method"]: r for r in rows if r.get("runner") != "job"}  # the harness's steps, as the seed's table
    full = by.get("full") if by.get("full", {}).get("status") == "ok" else None
    quality = quality or {}
    lines = [
        f"{'':<7} {'peak GiB':>9} {'vs full':>8} {'step time vs full':>18} {'quality vs full':>16}"
        "   seed: VRAM  time  quality"
    ]
    for method in ("full", "lora", "qlora"):
        r = by.get(method, {})
        ok = r.get("status") == "ok"
        has_mem = ok and full and r.get("peak_alloc_gib") and full.get("peak_alloc_gib")
        mem_pct = f"{100 * r['peak_alloc_gib'] / full['peak_alloc_gib']:.0f}%" if has_mem else "n/a"
        time_pct = f"{100 * r['step_s'] / full['step_s']:.0f}%" if ok and full else "n/a"
        peak = _fmt(r.get("peak_alloc_gib"), "9.2f") if ok else f"{r.get('status', 'not run'):>9}"
        lines.append(
            f"{method:<7} {peak:>9} {mem_pct:>8} {time_pct:>18} {quality.get(method, 'not measured'):>16}"
            f"   {SEED[method][0]:>10}  {SEED[method][1]:>4}  {SEED_QUALITY[method]:>7}"
        )
    if quality:
        lines.append("quality: benchmarks/quality.py's latest results (template rows as pretrained / zeroed)")
    return "\n".join(lines)

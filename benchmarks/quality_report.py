"""The quality benchmark's report (benchmarks/quality.py): each method's best cell over its learning-rate grid and
seeds, the table it prints, the README's row, the results file the rows go to, and `report`: the table over the rows
of several processes that share one --tag. `methods` is quality.py's METHODS (name -> (stack, settings))."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

_KEPT_META = ("run", "card", "commit", "torch", "transformers", "tag")  # copied from the first run row to a best row


def best_rows(rows: list[dict], methods: dict) -> list[dict]:
    """Per (method, zeroed): the learning rate of the best mean accuracy over the seeds, that mean, its range over
    the seeds, and its ratio to full fine-tuning's best mean on that base."""
    out = []
    for zeroed in (False, True):
        best = {}
        for cell in _seed_means(rows, zeroed):
            if cell["method"] not in best or cell["accuracy"] > best[cell["method"]]["accuracy"]:
                best[cell["method"]] = cell
        full = best.get("full", {}).get("accuracy")
        lowest = {}  # per method: the cell of the lowest mean held-out answer loss (rows without it: none)
        for cell in _seed_means(rows, zeroed):
            if cell["answer_loss"] is not None and (
                cell["method"] not in lowest or cell["answer_loss"] < lowest[cell["method"]]["answer_loss"]
            ):
                lowest[cell["method"]] = cell
        for method in methods:
            b, low = best.get(method), lowest.get(method)
            why = next((r.get("reason") for r in rows if r["method"] == method and r["zeroed"] == zeroed), None)
            kept = ("accuracy", "accuracy_min", "accuracy_max", "token_accuracy", "seeds", "lr")
            out.append(
                {
                    **{k: v for k, v in rows[0].items() if k in _KEPT_META},
                    "kind": "best",
                    "method": method,
                    "stack": methods[method][0],
                    "zeroed": zeroed,
                    **{k: None if b is None else b[k] for k in kept},
                    "relative_to_full": None if b is None or not full else b["accuracy"] / full,
                    "answer_loss": None if low is None else low["answer_loss"],
                    "answer_loss_range": None if low is None else [low["answer_loss_min"], low["answer_loss_max"]],
                    "answer_loss_lr": None if low is None else low["lr"],
                    "status": "ok" if b is not None else "unavailable",
                    "reason": None if b is not None else why,
                }
            )
    return out


def _seed_means(rows: list[dict], zeroed: bool) -> list[dict]:
    """Each (method, lr) of one base that ran on every seed it was given: mean accuracy and token accuracy over the
    seeds, the accuracy's min and max, the seeds."""
    cells: dict = {}
    for r in rows:
        if r["zeroed"] == zeroed:
            cells.setdefault((r["method"], r["lr"]), []).append(r)
    out = []
    for (method, lr), runs in cells.items():
        if any(r["status"] != "ok" for r in runs):
            continue
        acc = [r["accuracy"] for r in runs]
        tokens = sum(r["token_accuracy"] for r in runs) / len(runs)
        losses = [r["answer_loss"] for r in runs if r.get("answer_loss") is not None]
        losses = losses if len(losses) == len(runs) else []  # rows from before the field: no loss for the cell
        out.append(
            {
                "method": method,
                "lr": lr,
                "accuracy": sum(acc) / len(acc),
                "accuracy_min": min(acc),
                "accuracy_max": max(acc),
                "token_accuracy": tokens,
                "answer_loss": sum(losses) / len(losses) if losses else None,
                "answer_loss_min": min(losses) if losses else None,
                "answer_loss_max": max(losses) if losses else None,
                "seeds": sorted(r.get("seed", 0) for r in runs),
            }
        )
    return out


def table(best: list[dict], methods: dict, plan: dict, card: str, seeds: list[int]) -> str:
    """The best cell of each method and base: mean exact match over the seeds, its range, vs full, the LR."""
    over = f"mean of seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [
        f"quality: sort {plan['length']} digits (a task the base never saw), exact match on {plan['eval_rows']} "
        f"held-out rows, {plan['steps']} steps x {plan['batch']}; best of each method's LR grid, {over}; {card}",
        f"{'':<26}{'template rows as pretrained':^42}{'template rows zeroed':^42}",
        f"{'method':<16} {'stack':<9}" + f" {'accuracy':>9} {'range':>12} {'vs full':>8} {'lr':>7}  " * 2,
    ]
    by = {(r["method"], r["zeroed"]): r for r in best}
    for method in methods:
        cells = []
        for zeroed in (False, True):
            r = by[(method, zeroed)]
            if r["accuracy"] is None:
                cells.append(f" {'n/a':>9} {'':>12} {'':>8} {'':>7}  ")
                continue
            rel = "-" if r["relative_to_full"] is None else f"{100 * r['relative_to_full']:.1f}%"
            spread = f"{100 * r['accuracy_min']:.1f}-{100 * r['accuracy_max']:.1f}%"
            cells.append(f" {100 * r['accuracy']:>8.1f}% {spread:>12} {rel:>8} {r['lr']:>7.0e}  ")
        lines.append(f"{method:<16} {methods[method][0]:<9}" + "".join(cells))
    if any(r.get("answer_loss") is not None for r in best):
        lines += [
            "",
            "held-out answer loss (nats per answer token, lower is better): the lowest mean over each method's LR "
            "grid, its range over the seeds",
            f"{'method':<16} {'stack':<9}" + f" {'loss':>9} {'range':>14} {'lr':>7}  {'':>12}" * 2,
        ]
        for method in methods:
            cells = []
            for zeroed in (False, True):
                r = by[(method, zeroed)]
                if r.get("answer_loss") is None:
                    cells.append(f" {'n/a':>9} {'':>14} {'':>7}  {'':>12}")
                    continue
                low, high = r["answer_loss_range"]
                cells.append(
                    f" {r['answer_loss']:>9.4f} {f'{low:.3f}-{high:.3f}':>14} {r['answer_loss_lr']:>7.0e}  {'':>12}"
                )
            lines.append(f"{method:<16} {methods[method][0]:<9}" + "".join(cells))
    notes = sorted({f"{r['method']}: {r['reason']}" for r in best if r["accuracy"] is None and r["reason"]})
    lines += [f"  n/a {n}" for n in notes]
    return "\n".join(lines)


def readme_row(best: list[dict]) -> str:
    """The README's quality row: lorafuse LoRA / QLoRA vs full, as pretrained / with zeroed template rows."""
    by = {(r["method"], r["zeroed"]): r for r in best}

    def cell(method):
        parts = [by[(method, z)]["relative_to_full"] for z in (False, True)]
        return " / ".join("n/a" if p is None else f"{100 * p:.1f}%" for p in parts)

    head = "| vs full (template rows as pretrained / zeroed) | full | LoRA | QLoRA | QLoRA fast + FP8 | seed QLoRA |"
    return (
        f"{head}\n|---|---|---|---|---|---|\n"
        f"| sort digits, exact match | 100% | {cell('lora')} | {cell('qlora')} | {cell('qlora+fast+fp8')} "
        f"| {cell('seed qlora')} |"
    )


def append_rows(out: Path, rows: list[dict]) -> None:
    """Append rows to the results file, one write per line (processes running side by side share the file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def results_file(folder: str, card: str) -> Path:
    slug = card.lower().replace("nvidia ", "").replace(" ", "-")
    return Path(folder) / f"{dt.date.today().isoformat()}-{slug}-quality.jsonl"


def _settings(row: dict) -> tuple:
    """What a row's run changed beside the method and rate: one table holds one value of each."""
    keys = ("token_row_init", "lora_rank", "lora_variant", "modules_to_save", "modules_to_save_lr", "token_rows_lr")
    return tuple(str(row.get(k)) for k in keys)


def report(tag: str, folder: str, methods: dict) -> int:
    """The table of every run row tagged `tag` (or any of its comma-separated tags) in `folder`'s results files
    (runs made by several processes or machines side by side, e.g. one per seed), its best rows appended to the
    newest of those files."""
    files = sorted(Path(folder).glob("*-quality.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    tags = set(tag.split(","))
    runs = [r for r in rows if r.get("kind") == "run" and r.get("tag") in tags]
    if not runs:
        print(f"error: no run rows tagged {tag!r} in {folder}/*-quality.jsonl", file=sys.stderr)
        return 2
    tasks = {(r["task"], r["steps"], r["batch"], r.get("eval_rows"), r["card"], *_settings(r)) for r in runs}
    if len(tasks) != 1:
        mixed = sorted(map(str, tasks))
        print(f"error: rows tagged {tag!r} mix settings {mixed}: give each grid its own tag", file=sys.stderr)
        return 2
    seen = set()
    for r in runs:
        key = (r["method"], r["zeroed"], r["lr"], r.get("seed", 0))
        if key in seen:
            print(f"error: rows tagged {tag!r} hold {key} twice: give each grid its own tag", file=sys.stderr)
            return 2
        seen.add(key)
    task, steps, batch, eval_rows, card, *_ = tasks.pop()
    plan = {"length": int(task.split()[1]), "steps": steps, "batch": batch, "eval_rows": eval_rows}
    seeds = sorted({r.get("seed", 0) for r in runs})
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    best = [{**b, "run": stamp, "tag": tag} for b in best_rows(runs, methods)]  # the newest: `bench --table` shows it
    print(table(best, methods, plan, card, seeds))
    print("\n" + readme_row(best))
    append_rows(files[-1], best)
    print(f"\n{len(runs)} run rows tagged {tag!r} from {len(files)} file(s); best rows appended to {files[-1]}")
    return 0


def run_meta(device) -> dict:
    """What every row of a quality run records: its stamp, the card, the commit, the library versions."""
    import torch
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    meta = {"run": stamp, "card": card, "commit": commit.strip(), "torch": torch.__version__}
    meta["transformers"] = transformers.__version__
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        pass
    return meta

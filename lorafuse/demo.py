"""The built-in demo (`lorafuse train` with no config): what it teaches, and the before/after table it ends with.

The tiny random-init Llama (builtin:tiny-llama, 4 layers, hidden 128) learns to translate simple sentences between
Japanese and English. The bundled rows (lorafuse/data/samples/demo.jsonl, data.format dolly-ja) are built from a
small vocabulary: 6 adjectives x 8 animals x 6 actions,

    英語に翻訳してください: 赤い猫が走っています。   ->  The red cat is running.
    日本語に翻訳してください: The red cat is running.  ->  赤い猫が走っています。

40 of the 288 (adjective, animal, action) combinations are left out of the training rows in both directions
(builtin:demo-heldout). Getting those right means the model learned the words and the instruction, not the rows. The
run stops at its best eval loss (train.early_stopping_patience with a min delta) and keeps that checkpoint's adapter.

At the end, `before_after` prints a few held-out prompts with the answers of the base model (the random-init
weights, loaded afresh: gibberish) and of the trained adapter, both greedy and prompted the same way (the trained
format), and the exact-match count over every held-out prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorafuse import builtin

TABLE_ROWS = 4  # held-out prompts shown, half of each direction
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class DemoResult:
    exact: int  # held-out prompts answered exactly right by the trained adapter
    total: int
    base_exact: int  # ... and by the base, on the table's prompts
    shown: int


def heldout_rows() -> list[dict]:
    """The held-out {"instruction", "output"} rows, in file order (each combination's two directions adjacent)."""
    path = builtin.data_path("demo-heldout")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_demo(cfg) -> bool:
    return cfg.model.path == builtin.BUILTIN_MODEL and cfg.data.path == builtin.BUILTIN_DATA


def _answers(model, tokenizer, rows: list[dict]) -> list[str]:
    from lorafuse.infer.generate import generate, user_message

    return [
        generate(model, tokenizer, [user_message(r["instruction"])], max_new_tokens=MAX_NEW_TOKENS).strip()
        for r in rows
    ]


def _base_model(cfg, like):
    """The base as training started from it: the random-init weights, loaded afresh, prompted like `like`."""
    from lorafuse.model.load import load_model
    from lorafuse.model_state import model_state

    base, _ = load_model(cfg.model.path, quant=cfg.model.quant, compute_dtype=next(like.parameters()).dtype)
    model_state(base).prompt = model_state(like).prompt
    return base.to(next(like.parameters()).device)


def before_after(cfg, model, tokenizer, console) -> DemoResult:
    """Print the before/after table of held-out prompts and the held-out exact-match count (module docstring)."""
    rows = heldout_rows()
    after = _answers(model.eval(), tokenizer, rows)
    shown = rows[: TABLE_ROWS // 2 * 2 : 2] + rows[1 : TABLE_ROWS // 2 * 2 : 2]  # both directions
    before = _answers(_base_model(cfg, model), tokenizer, shown)
    exact = sum(a == r["output"] for a, r in zip(after, rows))
    console.print(
        "held-out prompts (not in the training rows): the base model's answer (random weights), then the adapter's"
    )
    for row, old in zip(shown, before):
        new = after[rows.index(row)]
        mark = "right" if new == row["output"] else f"expected {row['output']}"
        console.print(f"  {row['instruction']}", highlight=False, markup=False)
        console.print(f"    before: {old or '(nothing)'}", highlight=False, markup=False)
        console.print(f"    after:  {new or '(nothing)'}   ({mark})", highlight=False, markup=False)
    base_exact = sum(old == r["output"] for old, r in zip(before, shown))
    console.print(
        f"held-out exact answers: {exact} of {len(rows)} after training ({base_exact} of {len(shown)} before)",
        highlight=False,
    )
    console.print(
        f"try others: lorafuse chat --model {cfg.model.path} --adapter {cfg.output.dir}/adapter   "
        f"(then type, e.g., {rows[-2]['instruction']})",
        highlight=False,
        markup=False,
    )
    return DemoResult(exact, len(rows), base_exact, len(shown))

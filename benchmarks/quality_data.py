"""The quality benchmark's synthetic world: a character-level tokenizer, the pretraining tasks, the held-out task.

Pretraining (plain text, no chat template, one example a line, packed):
    copy: 3 9 1 = 3 9 1          reverse: 3 9 1 = 1 9 3       rotate: 3 9 1 = 9 1 3
    inc: 3 9 1 = 4 0 2           dec: 3 9 1 = 2 8 0           repeat: 3 9 = 3 3 9 9
    interleave: 3 9 | a b = 3 a 9 b                            (the same on letters a-z)
Held-out task (fine-tuning and evaluation, in the ChatML template), SORT_LENGTH digits (6 unless asked):
    user "sort: 7 2 9 2 0 5"  ->  assistant "0 2 2 5 7 9"
Nothing in pretraining orders, compares, counts or picks a minimum: sorting is new to the base, so its learning
is what separates the methods (with an ordering task in pretraining, every method reaches ~100% and shows no gap).

The template's special tokens `<|im_start|>` and `<|im_end|>` never occur in pretraining: their rows stay at the
random initialisation (the head's pushed down by the softmax). The zeroed variant sets both tables' rows of those
two tokens to exactly zero, as Llama-3 base ships `<|eot_id|>` and `<|start_header_id|>`. An answer counts only when
the model ends it with `<|im_end|>` (exact match of answer + `<|im_end|>`): with a zero head row that token's logit
is stuck at 0, which is how an untrained end-of-turn row makes a fine-tuned model run on.
"""

from __future__ import annotations

import random

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz :=|\n")
VOCAB_ROWS = 64  # the model's table rows (a multiple of 16, as real vocabularies are padded); the rest are spare

CHAT_TEMPLATE = (  # ChatML, the assistant span marked for completion-only training (as lorafuse.model.tiny's)
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_tokenizer():
    """One token per character, the ChatML markers as special tokens, the template above."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=TEMPLATE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _seq(rng: random.Random, alphabet: str, lo: int = 3, hi: int = 9) -> list[str]:
    return [rng.choice(alphabet) for _ in range(rng.randint(lo, hi))]


def _shift(s: list[str], alphabet: str, by: int) -> list[str]:
    return [alphabet[(alphabet.index(c) + by) % len(alphabet)] for c in s]


def pretraining_line(rng: random.Random) -> str:
    """One pretraining example: a task name, its input, '=', its output."""
    alphabet = DIGITS if rng.random() < 0.5 else LETTERS
    s = _seq(rng, alphabet)
    task = rng.choice(["copy", "reverse", "rotate", "inc", "dec", "repeat", "interleave"])
    if task == "copy":
        out = s
    elif task == "reverse":
        out = s[::-1]
    elif task == "rotate":
        out = s[1:] + s[:1]
    elif task in ("inc", "dec"):
        out = _shift(s, alphabet, 1 if task == "inc" else -1)
    elif task == "repeat":
        out = [c for c in s for _ in range(2)]
    else:
        t = _seq(rng, LETTERS if alphabet == DIGITS else DIGITS, len(s), len(s))
        return f"interleave: {' '.join(s)} | {' '.join(t)} = {' '.join(c for pair in zip(s, t) for c in pair)}"
    return f"{task}: {' '.join(s)} = {' '.join(out)}"


def pretraining_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(pretraining_line(rng) for _ in range(n_lines)) + "\n"


def char_ids(tokenizer, text: str):
    """An int64 array of the ids `tokenizer(text, add_special_tokens=False)` gives for text of `CHARS` only (one
    token per character), by a table lookup: the pretraining stream is ~80M characters, which the tokenizer takes
    minutes and tens of GiB to split one by one."""
    import numpy as np

    table = np.full(128, -1, dtype=np.int64)
    for c in CHARS:
        table[ord(c)] = tokenizer.convert_tokens_to_ids(c)
    codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    ids = table[codes]
    if (ids < 0).any():
        raise ValueError(f"character outside the vocabulary: {chr(int(codes[np.argmax(ids < 0)]))!r}")
    return ids


def sort_rows(n: int, seed: int, length: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` distinct rows sorting `length` digits, in lorafuse's `messages` format, none of whose prompts is in
    `exclude`."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        s = [rng.choice(DIGITS) for _ in range(length)]
        prompt = f"sort: {' '.join(s)}"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": " ".join(sorted(s))},
                ]
            }
        )
    return rows

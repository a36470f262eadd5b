"""The quality benchmark's training pieces that are not lorafuse: pretraining the base from scratch, the plain
fine-tuning loop full fine-tuning and the seed's stack (transformers + peft + bitsandbytes) share, and the
exact-match evaluation every method is scored with.

Step (fine-tuning, every method alike): the mean next-token cross-entropy over the answer tokens and the closing
`<|im_end|>` of the micro-batch (prompt tokens masked), AdamW (betas 0.9/0.999, no weight decay), gradient norm
clipped at 1.0, lorafuse's LR schedule (3% linear warmup, cosine to 0). On CUDA the math runs under bf16
autocast with fp32 master weights (full fine-tuning) or fp32 adapters (peft), as lorafuse runs it.

Evaluation: greedy decoding of every held-out prompt (all the same length: no padding), one token at a time for
the answer's length + 1 steps; a row is right when the tokens are exactly the answer followed by `<|im_end|>`.
Beside it, the token accuracy: the share of answer tokens (and `<|im_end|>`) the model predicts right given the
right ones before them (one teacher-forced forward), a graded signal where exact match is near 0 or 1.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from quality_data import TEMPLATE_TOKENS, VOCAB_ROWS, char_ids, pretraining_text

from lorafuse.training.optim import LRSchedule

IGNORE = -100


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build_base(size: dict, tokenizer, seed: int):
    """A random-init Llama of `size` (hidden, layers, heads, intermediate) for the character vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, steps: int, batch: int, seq: int, lr: float, device, seed: int) -> list[float]:
    """Next-token training on packed pretraining text (each row: BOS + seq-1 tokens). Returns the losses."""
    n_tokens = steps * batch * (seq - 1)
    stream = char_ids(tokenizer, pretraining_text(n_tokens // 12 + 16, seed))
    data = torch.from_numpy(stream[:n_tokens].copy()).view(steps, batch, seq - 1)
    bos = torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = LRSchedule(lr, steps, 0.05, "cosine")
    losses = []
    for step in range(steps):
        schedule.apply(opt, step)
        ids = torch.cat([bos, data[step]], dim=1).to(device)
        with autocast(device):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read once at the end: a read per step would wait for the GPU each step
    return torch.stack(losses).tolist()


def save_bases(model, tokenizer, folder: Path, dtype: torch.dtype) -> dict[str, Path]:
    """The pretrained base as it is ("plain") and with the template tokens' rows zeroed in both tables ("zeroed")."""
    out = {}
    for variant in ("plain", "zeroed"):
        m = model.to("cpu", dtype)
        if variant == "zeroed":
            ids = tokenizer.convert_tokens_to_ids(TEMPLATE_TOKENS)
            with torch.no_grad():
                m.get_input_embeddings().weight[ids] = 0
                m.get_output_embeddings().weight[ids] = 0
        path = folder / variant
        m.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[variant] = path
    return out


def encode(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) (N, T) of chat rows of one length, as lorafuse tokenizes them: the labels keep the
    answer, its `<|im_end|>` and an EOS after it (the template writes none; lorafuse appends one and trains it)."""
    ids, labels = [], []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in rows:
        prompt = _ids(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True))
        full = _ids(tokenizer.apply_chat_template(row["messages"]))
        stop = full.index(end, len(prompt)) + 1  # the newline the template writes after <|im_end|> is dropped
        ids.append(full[:stop] + [tokenizer.eos_token_id])
        labels.append([IGNORE] * len(prompt) + ids[-1][len(prompt) :])
    return torch.tensor(ids), torch.tensor(labels)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def finetune(model, params, encoded, lr: float, steps: int, batch: int, device, seed: int) -> float:
    """The plain loop (module docstring) over `steps` micro-batches of the shuffled rows `encoded` (`encode`'s
    ids and labels); `params`: tensors or param groups (a group's "lr_scale" scales its rate: LoRA+). Returns the
    seconds it took."""
    ids, labels = encoded
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)  # params may be LoRA+ groups
    params = [p for group in opt.param_groups for p in group["params"]]
    schedule = LRSchedule(lr, steps, 0.03, "cosine")
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        schedule.apply(opt, step)
        pick = [order[(step * batch + i) % len(order)] for i in range(batch)]
        x, y = ids[pick].to(device), labels[pick].to(device)
        with autocast(device):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def answer_scores(model, encoded, device, batch: int = 512) -> tuple[float, float]:
    """(token accuracy, answer loss) of the answer tokens and `<|im_end|>`, each predicted after the right ones
    before it, from one forward of the held-out rows: the share predicted right (module docstring), and the mean
    negative log-likelihood in nats (fp32). The loss is a continuous measure: it moves less from seed to seed than
    exact match, which flips a whole row on one token."""
    ids, labels = encoded
    n_prompt = int((labels[0] == IGNORE).sum())
    model.eval()
    right, nll = 0, 0.0
    for start in range(0, len(ids), batch):
        x = ids[start : start + batch].to(device)
        with autocast(device):
            logits = model(input_ids=x[:, :-1]).logits[:, n_prompt - 1 : -1].float()
        want = x[:, n_prompt:-1]
        right += int((logits.argmax(-1) == want).sum())
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), want.flatten(), reduction="sum"))
    scored = len(ids) * (ids.shape[1] - 1 - n_prompt)
    return right / scored, nll / scored


@torch.no_grad()
def exact_match(model, encoded, device, batch: int = 512) -> float:
    """Share of the rows (`encode`'s ids and labels) whose greedy continuation is exactly the answer followed by
    `<|im_end|>` (module docstring)."""
    ids, labels = encoded
    n_prompt = int((labels[0] == IGNORE).sum())
    want = ids[:, n_prompt:-1]  # the answer and <|im_end|>; what follows does not count
    model.eval()
    right = 0
    for start in range(0, len(ids), batch):
        x = ids[start : start + batch, :n_prompt].to(device)
        for _ in range(want.shape[1]):
            with autocast(device):
                nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        right += int((x[:, n_prompt:].cpu() == want[start : start + batch]).all(dim=1).sum())
    return right / len(ids)

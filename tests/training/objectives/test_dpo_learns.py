"""DPO with the demo's settings moves a tiny model toward the chosen answers on held-out pairs.

The bundled pairs (lorafuse/data/samples/preference*.jsonl) prefer the answer in the language the question was
asked in; every held-out question comes once in Japanese and once in English with chosen and rejected swapped, so
favouring one language can reach a preference accuracy of 0.5 at most: above that, the model follows the question.
The objective's settings (beta, loss, lr, pairs per batch, data) are examples/tiny-dpo-cpu.yaml's; the model is
the test suite's tiny random Llama with a fresh adapter (the example starts from a merged SFT model instead), and
the loop is a plain AdamW loop, as the training loop's integration is tested with the loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafuse.accel import simple_head
from lorafuse.config import load_config
from lorafuse.data.build import build_datasets
from lorafuse.data.collate import Batcher
from lorafuse.model.inject import apply_lora
from lorafuse.model.tiny import build_tiny_model
from lorafuse.training.objectives import ObjectiveContext, build_objective, evaluate
from lorafuse.training.runtime import Precision

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "tiny-dpo-cpu.yaml"
STEPS = 12


def test_dpo_moves_held_out_pairs_toward_chosen(tiny_tokenizer):
    cfg = load_config(EXAMPLE)
    tok, tc = tiny_tokenizer, cfg.train
    train, held, _ = build_datasets(cfg.data, tok)
    torch.manual_seed(tc.seed)
    lora = cfg.lora
    model = apply_lora(
        build_tiny_model(tokenizer=tok), r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets
    )
    ctx = ObjectiveContext(Precision(torch.device("cpu"), torch.float32), simple_head(model))
    objective = build_objective(tc)
    held_out = Batcher(held, 30, tok.pad_token_id, pairs=True, shuffle=False)
    before = evaluate(objective, model, held_out, ctx)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=0.0)
    batches = Batcher(train, tc.micro_batch_size, tok.pad_token_id, pairs=True, seed=tc.seed).epoch_batches(0)
    for _, batch in zip(range(STEPS), batches):
        loss, _ = objective.loss_sum(model, batch, ctx)
        (loss / objective.units(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate(objective, model, held_out, ctx)
    assert before["rewards/margin"] == 0.0 and before["rewards/accuracy"] == 0.0  # policy == reference at the start
    assert after["units"] == 60 and after["rewards/accuracy"] > 0.75  # beyond what a language bias can reach
    assert after["rewards/margin"] > 0 and after["loss"] < before["loss"]
    assert after["logps/chosen"] > before["logps/chosen"] and after["logps/rejected"] < before["logps/rejected"]

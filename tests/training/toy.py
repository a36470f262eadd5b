"""Toy fixtures for the training tests: a tiny Llama with a trainable subset, and deterministic batches."""

from __future__ import annotations

import torch

from lorafuse.model.tiny import build_tiny_model


def toy_model(seed: int = 0, dropout: float = 0.1, vocab_size: int = 96, hidden: int = 32):
    """A 2-layer Llama (hidden 32) with q_proj/v_proj weights trainable, everything else frozen.

    Attention dropout is on so that resume tests depend on the restored RNG state.
    """
    model = build_tiny_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        seed=seed,
    )
    model.config.attention_dropout = dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight")))
    return model


class ToyBatches:
    """`n_micro` padded micro-batches per epoch, a deterministic function of (seed, epoch).

    Sequences have random lengths (right padding), the first third of each is a masked "prompt", and the
    targets follow a simple rule (next token = token + 1 mod V) so a model can learn them.
    """

    def __init__(
        self, n_micro: int = 6, micro_batch_size: int = 2, seq_len: int = 12, vocab_size: int = 96, seed: int = 0
    ):
        self.n_micro, self.mbs, self.seq_len, self.vocab, self.seed = (
            n_micro,
            micro_batch_size,
            seq_len,
            vocab_size,
            seed,
        )

    def __len__(self) -> int:
        return self.n_micro

    def epoch_batches(self, epoch: int, start: int = 0):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        for k in range(self.n_micro):
            first = torch.randint(4, self.vocab, (self.mbs, 1), generator=g)
            ids = (first + torch.arange(self.seq_len)) % (self.vocab - 4) + 4
            lengths = torch.randint(self.seq_len // 2, self.seq_len + 1, (self.mbs,), generator=g)
            mask = (torch.arange(self.seq_len)[None, :] < lengths[:, None]).long()
            ids = ids * mask + 3 * (1 - mask)  # pad id 3
            labels = ids.clone()
            labels[mask == 0] = -100
            labels[:, : self.seq_len // 3] = -100
            if k >= start:
                yield {"input_ids": ids, "attention_mask": mask, "labels": labels}

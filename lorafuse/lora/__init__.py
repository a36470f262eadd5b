"""LoRA layers: `LoRALinear` (dense or NF4 weight, scaling, dropout; DoRA in dora.py), switching adapters off
(disable.py) and trainable token rows (token_rows.py). Imports neither lorafuse.model nor the lorafuse package."""

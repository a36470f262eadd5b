"""Tiny random-init models and tokenizers, built offline.

The demo (`lorafuse train` with no config) and the test suite need a causal LM and a tokenizer without
any download. `build_tiny_tokenizer` trains a byte-level BPE on a small corpus (seconds on a CPU) and
gives it a ChatML-style chat template; with `split_scripts` its merges are learned within runs of one script
(kanji, hiragana, katakana), so a Japanese word becomes the same tokens in any sentence, as with a tokenizer trained
on a large corpus (the built-in demo model's tokenizer). `build_tiny_model` makes a random-init model of a
transformers architecture ("llama", "qwen2", "gpt2", ...) sized for that tokenizer. `save_tiny` writes both to a
folder that `transformers.AutoModelForCausalLM.from_pretrained` and `lorafuse.load_model` read.

The tokenizer has distinct special tokens: `<s>` (BOS), `</s>` (EOS), `<pad>` (PAD), `<unk>`, and the
chat markers `<|im_start|>`, `<|im_end|>`. PAD is never EOS, so padding can never hide EOS.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# A ChatML-style template. `{% generation %}` marks assistant spans so transformers can return an
# assistant-token mask; the end-of-turn marker and EOS are inside the span so they are learned.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SCRIPT_RUNS = r"\p{Han}+|\p{Hiragana}+|\p{Katakana}+"
_BUILTIN_CORPUS = [
    "### 指示:\n次の文を英語に翻訳してください。\n\n### 入力:\n今日は良い天気です。\n\n"
    "### 回答:\nThe weather is nice today.",
    "### Instruction:\nName three primary colors.\n\n### Response:\nRed, blue and yellow.",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "The quick brown fox jumps over the lazy dog. Fine-tuning adapts a pretrained model to a task.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : ; , . ! ? ' \" # @ % & _",
]


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512, split_scripts: bool = False):
    """Train a byte-level BPE tokenizer on `corpus` (plus a built-in bilingual corpus) and wrap it.

    Returns a `transformers.PreTrainedTokenizerFast` with BOS/EOS/PAD/UNK set and `CHAT_TEMPLATE`.
    Deterministic for a given corpus and vocab_size.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Trained on runs of one script, the merges cannot span "赤い猫" (kanji|hiragana|kanji): without the split a small
    # corpus merges whole phrases into tokens cut mid-character, which a tiny model cannot learn to recombine. The
    # saved tokenizer keeps the plain GPT-2 byte-level pre-tokenizer (what llama.cpp and others implement): the
    # merges alone keep the boundaries. Off by default: the test suite's tokenizers stay as they were.
    split = [pre_tokenizers.Split(Regex(_SCRIPT_RUNS), behavior="isolated")] if split_scripts else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(_BUILTIN_CORPUS) + list(corpus or [])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.pre_tokenizer = byte_level
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    tokenizer=None,
):
    """A random-init causal LM of architecture `arch` ("llama", "qwen2", "mistral", "gpt2").

    Special-token ids are taken from `tokenizer` when given, so generation stops at its EOS.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if arch == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            **ids,
        )
    else:
        cfg = AutoConfig.for_model(
            arch,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            **ids,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if model.generation_config is not None and ids:
        model.generation_config.eos_token_id = ids["eos_token_id"]
        model.generation_config.pad_token_id = ids["pad_token_id"]
        model.generation_config.bos_token_id = ids["bos_token_id"]
    return model


def save_tiny(
    folder: str | Path,
    arch: str = "llama",
    corpus: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    **model_kwargs,
) -> Path:
    """Build a tiny tokenizer and model and save both to `folder` (a normal HF model folder)."""
    folder = Path(folder)
    tok = build_tiny_tokenizer(corpus)
    model = build_tiny_model(arch, tokenizer=tok, **model_kwargs).to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

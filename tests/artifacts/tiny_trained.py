"""Tiny trained adapters for the export tests (imported by conftest.py and the tests).

An adapter is trained (plain Adam on the LoRA weights, full batch) until the model has memorised three short
conversations, so that greedy decoding has clear winners and ends each answer with the end-of-turn token: llama.cpp
must then reproduce the answers token for token and stop where the trained model stops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONVERSATIONS = [
    [
        {"role": "user", "content": "Name three primary colors."},
        {"role": "assistant", "content": "Red, blue and yellow."},
    ],
    [{"role": "user", "content": "日本の首都はどこですか?"}, {"role": "assistant", "content": "東京です。"}],
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
]
FIT_STEPS = 60


@dataclass(frozen=True)
class Trained:
    base: Path
    adapter: Path
    quant: str  # how the base was loaded in training: "nf4" or "none"
    arch: str


def fit_adapter(base: Path, adapter: Path, quant: str, seed: int = 0, **lora) -> Path:
    """Train a LoRA adapter on CONVERSATIONS (whole sequences) and save it with lorafuse's save_adapter."""
    import lorafuse

    model, tok = lorafuse.load_model(str(base), quant=quant, compute_dtype="float32", device="cpu")
    torch.manual_seed(seed)
    lorafuse.apply_lora(model, **({"r": 8, "alpha": 16, "targets": "all-linear"} | lora))
    seqs = [
        torch.tensor([tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]]) for c in CONVERSATIONS
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(FIT_STEPS):
        loss = sum(model(input_ids=s, labels=s).loss for s in seqs) / len(seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lorafuse.save_adapter(model.eval(), adapter, tokenizer=tok)
    return adapter


def tiny_base(folder: Path, arch: str, tokenizer, rope: dict | None = None, tied: bool = False) -> Path:
    """A saved tiny random-init model; `rope` updates config.json's rope_parameters (e.g. a llama3 scaling), `tied`
    shares the embedding with the output head."""
    from lorafuse.model.tiny import build_tiny_model

    build_tiny_model(arch, tokenizer=tokenizer, tie_word_embeddings=tied).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if rope:
        config = json.loads((folder / "config.json").read_text())
        config["rope_parameters"] = config["rope_parameters"] | rope
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# Tokenizer families other than the tiny (GPT-2 style) one, built offline. The split patterns are the ones the
# published Llama-3 and Qwen2 tokenizer.json files carry.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{ m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(style: str):
    """A byte-level BPE in Llama-3 ("llama3": BOS added, merges ignored for whole-vocab words) or Qwen2 ("qwen2": no
    BOS) style: a Split with that family's pattern, then ByteLevel without its own regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafuse.model.tiny import _BUILTIN_CORPUS

    llama3 = style == "llama3"
    specials = (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        if llama3
        else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tok = Tokenizer(models.BPE(ignore_merges=llama3))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT if llama3 else QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_BUILTIN_CORPUS) * 2, trainer=trainer)
    if llama3:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        names = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    else:
        names = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = LLAMA3_TEMPLATE if llama3 else QWEN2_TEMPLATE
    return fast


def sentencepiece_tokenizer(folder: Path):
    """A Llama-2 style tokenizer: a SentencePiece BPE model with byte fallback (Llama-2's trainer settings), saved as
    tokenizer.model and loaded (converted) by transformers. Needs the sentencepiece and protobuf packages."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from lorafuse.model.tiny import _BUILTIN_CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_BUILTIN_CORPUS) * 3),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=800,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    config["unk_token"] = "<unk>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(folder))

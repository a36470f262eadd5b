"""The tokenizer as GGUF vocabulary metadata (tokenizer.ggml.*), read from the training tokenizer's tokenizers JSON.

Two llama.cpp tokenizer models:
  "gpt2"  byte-level BPE (GPT-2, Llama-3, Qwen2/3, lorafuse's tiny tokenizer). Tokens as the JSON stores them (each
          byte mapped to a printable char), merges "a b" in rank order, and tokenizer.ggml.pre naming the split regex
          llama.cpp applies before BPE, recognised from the JSON's pre-tokenizer: ByteLevel's own regex -> "gpt-2", the
          Llama-3 Split pattern -> "llama-bpe", the Qwen2 one -> "qwen2". Any other split is refused: a wrong one
          would change tokenization without an error.
  "llama" SentencePiece (Llama-2, Mistral): BPE with byte fallback, or Unigram. Pieces keep "▁" for spaces; <0xNN>
          pieces are BYTE tokens. Scores: Unigram's log-probabilities as stored; for BPE, -(rank of the first merge
          that makes the piece), 0 for pieces no merge makes. llama.cpp merges the adjacent pair whose result scores
          highest, so these scores replay the merges in rank order.
Token types: CONTROL for special added tokens, USER_DEFINED for other added tokens (their raw text: llama.cpp matches
them before tokenizing), UNKNOWN for unk, BYTE, NORMAL. The token count is the embedding's row count: ids past the
tokenizer (a vocabulary padded for the embedding) are "[PAD<id>]" UNUSED; a tokenizer larger than the embedding is an
error. Special ids: bos, eos, unk, pad, eot (the chat template's end of turn); add_bos / add_eos as the tokenizer
behaves when encoding text; the chat template given (the one training used), with transformers' `{% generation %}` /
`{% endgeneration %}` markers (they only mark assistant spans for training masks) written as `{% if true %}` /
`{% endif %}`, same whitespace control: the same text, and Jinja engines without that extension can read it.
"""

from __future__ import annotations

import json
import re

from lorafuse.errors import ModelError

# llama.cpp pre-tokenizer name for the Split regex a tokenizers JSON applies before its ByteLevel step.
_SPLIT_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _SPLIT_TAIL
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _SPLIT_TAIL
_PRE_BY_SPLIT = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_GENERATION_TAG = re.compile(r"{%(-?)\s*(end)?generation\s*(-?)%}")


def write_vocab(writer, tokenizer, n_vocab: int, chat_template: str | None, eot_id: int | None) -> None:
    """Add the tokenizer.ggml.* keys for `tokenizer` (a transformers fast tokenizer) sized to `n_vocab` rows."""
    spec = _tokenizer_json(tokenizer)
    model = spec["model"]
    ids = tokenizer.get_vocab()
    if max(ids.values()) >= n_vocab:
        raise ModelError(
            f"the tokenizer has ids up to {max(ids.values())}, but the embedding has only {n_vocab} rows",
            "export with the tokenizer the model was trained with (the adapter folder's), or resize the embedding",
        )
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if model["type"] == "BPE" and not model.get("byte_fallback"):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_byte_level_pre(spec))
        scores = None
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    elif model["type"] in ("BPE", "Unigram"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        scores = _sentencepiece_scores(model, n_vocab)
    else:
        raise ModelError(
            f"a {model['type']} tokenizer cannot go into a GGUF file for a Llama/Qwen model",
            "GGUF export supports byte-level BPE and SentencePiece (BPE with byte fallback, Unigram) tokenizers",
        )
    by_id = {i: t for t, i in ids.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        types.append(_token_type(i, token, added, tokenizer.unk_token_id))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    _write_special_ids(writer, tokenizer, eot_id)
    if chat_template:
        writer.add_chat_template(portable_template(chat_template))


def portable_template(template: str) -> str:
    """`template` with its generation markers as always-true ifs (see module docstring): renders the same text."""

    def plain(m: re.Match) -> str:
        return "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}"

    return _GENERATION_TAG.sub(plain, template)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) tokenizer",
            "save the tokenizer with tokenizer.json (transformers converts a tokenizer.model when `sentencepiece` "
            "and `protobuf` are installed: pip install sentencepiece protobuf)",
        )
    return json.loads(backend.to_str())


def _steps(node: dict | None) -> list[dict]:
    """The pre-tokenizer / normalizer as a flat list of steps (a Sequence expanded)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers") or node.get("normalizers") or [] for s in _steps(child)]
    return [node]


def _byte_level_pre(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer (see module docstring)."""
    steps = _steps(spec.get("pre_tokenizer"))
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
        raise ModelError(
            "the tokenizer is a BPE without byte fallback but its pre-tokenizer is not a plain ByteLevel "
            f"({[s.get('type') for s in steps]}), so llama.cpp could not reproduce its tokenization",
            "GGUF export supports GPT-2, Llama-3 and Qwen2 style byte-level tokenizers and SentencePiece ones",
        )
    if not splits and byte_level[0].get("use_regex", True):
        return "gpt-2"
    pattern = splits[0].get("pattern", {}).get("Regex") if len(splits) == 1 else None
    if pattern in _PRE_BY_SPLIT and not byte_level[0].get("use_regex", True):
        return _PRE_BY_SPLIT[pattern]
    raise ModelError(
        f"the tokenizer splits text with a pattern lorafuse does not know llama.cpp's name for ({pattern!r}); "
        "a wrong name would change every tokenization in llama.cpp",
        "GGUF export knows the GPT-2, Llama-3 and Qwen2 splits; for another tokenizer export with `--format hf` and "
        "convert with llama.cpp's convert_hf_to_gguf.py",
    )


def _adds_space_prefix(spec: dict) -> bool:
    """SentencePiece: does encoding prepend "▁" to the text (Prepend normalizer or a prepending Metaspace)?"""
    for step in _steps(spec.get("normalizer")):
        if step.get("type") == "Prepend":
            return True
    for step in _steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _sentencepiece_scores(model: dict, n_vocab: int) -> list[float]:
    scores = [0.0] * n_vocab
    if model["type"] == "Unigram":
        for i, (_, score) in enumerate(model["vocab"]):
            scores[i] = float(score)
        return scores
    vocab = model["vocab"]
    for rank, merge in enumerate(model["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)  # rank 0 must still score below an unmerged piece's 0
    return scores


def _token_type(i: int, token: str | None, added: dict, unk_id: int | None) -> int:
    import gguf

    kind = gguf.TokenType
    if token is None:
        return int(kind.UNUSED)
    if i == unk_id:
        return int(kind.UNKNOWN)
    if i in added:
        return int(kind.CONTROL if added[i].get("special") else kind.USER_DEFINED)
    if _BYTE_PIECE.match(token):
        return int(kind.BYTE)
    return int(kind.NORMAL)


def _write_special_ids(writer, tokenizer, eot_id: int | None) -> None:
    for value, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (eot_id if eot_id != tokenizer.eos_token_id else None, writer.add_eot_token_id),
    ):
        if value is not None:
            add(int(value))
    probe = tokenizer("a")["input_ids"]  # what encoding plain text adds around it
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and probe[:1] == [bos])
    writer.add_add_eos_token(eos is not None and len(probe) > 1 and probe[-1] == eos)

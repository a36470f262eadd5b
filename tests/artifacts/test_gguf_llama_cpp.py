"""The exported GGUF files run in llama.cpp (llama-cpp-python) as the trained model does in lorafuse.

* Greedy answers: for each trained conversation, llama.cpp's greedy tokens equal lorafuse's greedy generation on the
  merged model (transformers), and both stop at the same end-of-turn token, which the GGUF marks as end of generation.
* Logits: on the f32 export with an f32 KV cache, llama.cpp's logits match the merged model's within the merge check's
  measured bound (lorafuse.artifacts.merge: CHECK_FACTOR x the logit change that weight noise of 2^-16 relative causes);
  the adapter's own effect is far above it, so a lost update, a wrong q/k row order or a missing bias fails.
* The adapter alone (llama.cpp's --lora) on the base GGUF gives the merged model's logits and answers.
* Tokenization: llama.cpp tokenizes like the tokenizer the model was trained with, for GPT-2, Llama-3 and Qwen2 style
  byte-level BPE, and like SentencePiece itself for a Llama-2 style SentencePiece model.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from tiny_trained import CONVERSATIONS, byte_level_tokenizer, sentencepiece_tokenizer, tiny_base  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lorafuse.artifacts.export import export  # noqa: E402
from lorafuse.artifacts.merge import CHECK_FACTOR, rounding_noise  # noqa: E402
from lorafuse.infer.generate import encode_prompt, stop_token_ids  # noqa: E402

MAX_NEW = 24
TEXTS = [
    "Hello world",
    "leading spaces and   runs  ",
    "日本の首都は東京です。",
    "numbers 12345 and 3.14159",
    "line one\nline two\n\n\nend",
    "tabs\tand 'quotes' don't I'LL",
    "emoji 🙂 ok",
]


@contextlib.contextmanager
def llama(path, **kw):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, **kw)
    try:
        yield llm
    finally:
        llm.close()


def merged_model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        str(folder)
    )


def llama_cpp_greedy(llm, ids: list[int]) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) == MAX_NEW:
            return out
    return out


@torch.no_grad()
def hf_greedy(model, tokenizer, ids: list[int]) -> list[int]:
    """lorafuse's greedy generation settings (lorafuse.generate): stop at EOS or the template's end of turn."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


def check_answers(llm, model, tokenizer) -> None:
    stops = stop_token_ids(model, tokenizer)
    for conversation in CONVERSATIONS:
        ids = encode_prompt(tokenizer, conversation[:1])
        want = hf_greedy(model, tokenizer, ids)
        assert tokenizer.decode(want, skip_special_tokens=True) == conversation[1]["content"]  # it was trained
        assert want[-1] in stops and len(want) < MAX_NEW  # and stops by itself
        assert llama_cpp_greedy(llm, ids) == want


@pytest.mark.parametrize(
    "name,quant", [("llama-nf4", "f16"), ("llama-nf4", "q8_0"), ("qwen2-mts", "q8_0"), ("qwen3", "bf16")]
)
def test_llama_cpp_answers_like_the_merged_model_and_stops(merged_fp32, exported, name, quant):
    model, tokenizer = merged_model(merged_fp32(name))
    with llama(exported(name, quant)) as llm:
        check_answers(llm, model, tokenizer)


def _inputs(tokenizer) -> list[list[int]]:
    chat = [m for c in CONVERSATIONS for m in c]
    return [
        tokenizer(TEXTS[0] + " " + TEXTS[2])["input_ids"],
        tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"],
    ]


def check_logits(llm, model, tokenizer, other) -> None:
    """llama.cpp's logits vs `model`'s within the measured bound, which must be far below the gap to `other` (the
    model without the thing under test: the base without the adapter, the model without its rope scaling, ...)."""
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([ids])).logits[0] for ids in inputs]
        effect = max(
            float((other(input_ids=torch.tensor([i])).logits[0] - w).abs().max()) for i, w in zip(inputs, want)
        )
    got = []
    for ids in inputs:
        llm.reset()
        llm.eval(ids)
        got.append(torch.from_numpy(np.array(llm.scores[: len(ids)])))
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    bound = CHECK_FACTOR * rounding_noise(
        model, [torch.tensor([i]) for i in inputs], torch.float32, [w[None] for w in want]
    )
    print(f"llama.cpp vs lorafuse: max |logit diff| {diff:.3g}, bound {bound:.3g}, gap to the other model {effect:.3g}")
    assert diff <= bound
    assert bound < effect / 10, "the bound must be far below what the tested difference changes"


F32_CACHE = dict(logits_all=True, type_k=0, type_v=0)  # GGML_TYPE_F32: no f16 rounding of keys/values


@pytest.mark.parametrize("name", ["llama-nf4", "qwen2-mts", "qwen3"])
def test_llama_cpp_logits_equal_the_merged_model(trained, merged_fp32, exported, name):
    model, tokenizer = merged_model(merged_fp32(name))
    base, _ = merged_model(trained(name).base)
    with llama(exported(name, "f32"), **F32_CACHE) as llm:
        check_logits(llm, model, tokenizer, base)


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2-tied"])
def test_llama_cpp_logits_equal_the_base_model(tiny_tokenizer, tmp_path, case):
    """Bases alone: llama3 rope scaling (rope_freqs) and a head tied to the embedding (no output tensor)."""
    if case == "llama3-rope":
        rope = LLAMA3_ROPE | {"original_max_position_embeddings": 16}  # scaled dims matter at these short lengths
        folder = tiny_base(tmp_path / "base", "llama", tiny_tokenizer, rope=rope)
        reference = tiny_base(tmp_path / "unscaled", "llama", tiny_tokenizer)  # same weights, no scaling
    else:
        folder = tiny_base(tmp_path / "base", "qwen2", tiny_tokenizer, tied=True)
        reference = tiny_base(tmp_path / "untied", "qwen2", tiny_tokenizer)  # same init, its own head
    model, tokenizer = merged_model(folder)
    other, _ = merged_model(reference)
    with llama(export(folder, None, tmp_path / "m.gguf", quant="f32").path, **F32_CACHE) as llm:
        check_logits(llm, model, tokenizer, other)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_lora_adapter_on_the_base_gguf_is_the_merged_model(trained, merged_fp32, tmp_path, name):
    t = trained(name)
    base_gguf = export(t.base, None, tmp_path / "base.gguf", quant="f32").path
    lora_gguf = export(t.base, t.adapter, tmp_path / "lora.gguf", quant="f32", lora_only=True).path
    model, tokenizer = merged_model(merged_fp32(name))
    base, _ = merged_model(t.base)
    with llama(base_gguf, lora_path=str(lora_gguf), **F32_CACHE) as llm:
        check_answers(llm, model, tokenizer)
        check_logits(llm, model, tokenizer, base)


@pytest.mark.parametrize("style", ["tiny", "llama3", "qwen2"])
def test_llama_cpp_tokenizes_like_the_training_tokenizer(tiny_tokenizer, tmp_path, style):
    tokenizer = tiny_tokenizer if style == "tiny" else byte_level_tokenizer(style)
    base = tiny_base(tmp_path / "base", "qwen2" if style == "qwen2" else "llama", tokenizer)
    path = export(base, None, tmp_path / "m.gguf").path
    specials = tokenizer.all_special_tokens
    with llama(path, vocab_only=True) as llm:
        for text in TEXTS + [" leading", specials[0] + "hi" + specials[-1] + " there"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
        for text in TEXTS:
            assert llm.detokenize(tokenizer(text, add_special_tokens=False)["input_ids"]) == text.encode(), text


def test_llama_cpp_tokenizes_a_sentencepiece_model_like_sentencepiece(tmp_path):
    """Llama-2 style: llama.cpp's SentencePiece tokenizer replays the BPE merges through the exported scores.

    Reference: SentencePiece itself. transformers' conversion agrees except on text that starts with a space (its
    Metaspace does not add the dummy prefix there), so the comparison with it leaves those out."""
    spm = pytest.importorskip("sentencepiece")
    tokenizer = sentencepiece_tokenizer(tmp_path / "tokenizer")
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer" / "tokenizer.model"))
    path = export(tiny_base(tmp_path / "base", "llama", tokenizer), None, tmp_path / "m.gguf").path
    with llama(path, vocab_only=True) as llm:
        for text in TEXTS + [" x", "  two"]:
            got = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert got == [tokenizer.bos_token_id] + reference.encode(text), text
            if not text.startswith(" "):
                assert got == tokenizer(text)["input_ids"], text

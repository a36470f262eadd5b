"""generate(): the trained prompt format (else the tokenizer's chat template) for prompts and messages, raw text,
stops at EOS / end-of-turn, greedy and sampling."""

from __future__ import annotations

import copy

import pytest

from lorafuse.infer.chat import chat_loop
from lorafuse.infer.generate import encode_prompt, generate, stop_token_ids


@pytest.fixture(scope="module")
def model_and_tok(tiny_tokenizer):
    from lorafuse.model.tiny import build_tiny_model

    return build_tiny_model("llama", tokenizer=tiny_tokenizer).eval(), tiny_tokenizer


def _force_token_after(model, token_id, n_new):
    """Make the model emit `token_id` as its (n_new)-th new token: a hook boosts that logit.

    Each forward call of generate() produces exactly one new token (the first call reads the prompt).
    """

    def hook(_module, _inputs, output):
        hook.calls += 1
        if hook.calls >= n_new:
            output = output.clone()
            output[:, -1, token_id] += 1e4
        return output

    hook.calls = 0
    return model.lm_head.register_forward_hook(hook)


def _generated_ids(model, call):
    """Run `call` and return the new token ids that model.generate produced."""
    original = model.generate
    seen = {}

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["new"] = out[0, kwargs["input_ids"].shape[1] :].tolist()
        return out

    model.generate = spy
    try:
        call()
    finally:
        del model.generate
    return seen["new"]


def test_messages_use_chat_template(model_and_tok):
    _, tok = model_and_tok
    msgs = [{"role": "user", "content": "日本の首都は?"}]
    ids = encode_prompt(tok, msgs)
    rendered = tok.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n日本の首都は?<|im_end|>" in rendered


def test_stops_at_eos(model_and_tok):
    model, tok = model_and_tok
    prompt = "The weather is"
    handle = _force_token_after(model, tok.eos_token_id, n_new=4)
    try:
        new = _generated_ids(model, lambda: generate(model, tok, prompt, max_new_tokens=40, raw=True))
    finally:
        handle.remove()
    assert len(new) == 4 and new[-1] == tok.eos_token_id and tok.eos_token_id not in new[:-1]


def test_stops_at_end_of_turn_for_chat(model_and_tok):
    model, tok = model_and_tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in stop_token_ids(model, tok) and tok.eos_token_id in stop_token_ids(model, tok)
    msgs = [{"role": "user", "content": "hello"}]
    handle = _force_token_after(model, end, n_new=3)
    try:
        new = _generated_ids(model, lambda: generate(model, tok, msgs, max_new_tokens=40))
    finally:
        handle.remove()
    assert len(new) == 3 and new[-1] == end


def test_greedy_is_deterministic_and_sampling_follows_seed(model_and_tok):
    model, tok = model_and_tok
    a = generate(model, tok, "Fine-tuning", max_new_tokens=12)
    b = generate(model, tok, "Fine-tuning", max_new_tokens=12)
    assert a == b and len(a) > 0
    s1 = generate(model, tok, "Fine-tuning", max_new_tokens=20, temperature=1.5, seed=1)
    s2 = generate(model, tok, "Fine-tuning", max_new_tokens=20, temperature=1.5, seed=1)
    s3 = generate(model, tok, "Fine-tuning", max_new_tokens=20, temperature=1.5, seed=2)
    assert s1 == s2
    assert s1 != s3


def test_bad_sampling_settings(model_and_tok):
    from lorafuse.errors import LorafuseError

    model, tok = model_and_tok
    with pytest.raises(LorafuseError, match="top_p"):
        generate(model, tok, "x", top_p=0.0)


def test_chat_loop_keeps_history(model_and_tok):
    import io

    model, tok = model_and_tok
    inputs = iter(["hello", "/reset", "again", "/exit"])
    out = io.StringIO()
    history = chat_loop(model, tok, max_new_tokens=4, temperature=0.0, input_fn=lambda _: next(inputs), output=out)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "again"
    assert "history cleared" in out.getvalue()


def _prompt_text(model, tok, prompt, **kw) -> str:
    return tok.decode(encode_prompt(tok, prompt, model, **kw))


@pytest.fixture
def dolly_ja_model(tiny_tokenizer):
    """A model that carries a plain dolly-ja prompt format with a system prompt, as load_adapter would set it."""
    from lorafuse.data.templates import plain_chat_template
    from lorafuse.model.prompt_format import PromptFormat
    from lorafuse.model.tiny import build_tiny_model
    from lorafuse.model_state import model_state

    model = build_tiny_model("llama", tokenizer=tiny_tokenizer).eval()
    model_state(model).prompt = PromptFormat(
        plain_chat_template("dolly-ja", bos=True), "簡潔に答えてください。", "</s>", "dolly-ja", "plain"
    )
    return model


def test_a_string_is_the_user_message_in_the_trained_format(dolly_ja_model, tiny_tokenizer):
    text = _prompt_text(dolly_ja_model, tiny_tokenizer, "日本の首都は？")
    assert text == "<s>簡潔に答えてください。\n\n### 指示:\n日本の首都は？\n\n### 回答:\n"
    with_input = [{"role": "user", "content": "英語にしてください。", "input": "猫"}]
    assert "### 指示:\n英語にしてください。\n\n### 入力:\n猫\n\n### 回答:\n" in _prompt_text(
        dolly_ja_model, tiny_tokenizer, with_input
    )
    given = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert _prompt_text(dolly_ja_model, tiny_tokenizer, given).startswith("<s>Be brief.\n\n### 指示:\nHi")


def test_raw_sends_the_text_as_written(dolly_ja_model, tiny_tokenizer):
    assert _prompt_text(dolly_ja_model, tiny_tokenizer, "### 指示:\nHi", raw=True) == "<s>### 指示:\nHi"


def test_without_a_trained_format_the_tokenizers_template_renders_and_folds_the_input(model_and_tok):
    model, tok = model_and_tok
    text = _prompt_text(model, tok, [{"role": "user", "content": "Translate.", "input": "猫"}])
    assert text.endswith("<|im_start|>user\nTranslate.\n\n猫<|im_end|>\n<|im_start|>assistant\n")
    assert _prompt_text(model, tok, "hello") == _prompt_text(model, tok, [{"role": "user", "content": "hello"}])


def test_a_base_without_any_chat_template_gets_the_text_as_written(tiny_tokenizer):
    from lorafuse.model.tiny import build_tiny_model

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    model = build_tiny_model("llama", tokenizer=tok)
    assert _prompt_text(model, tok, "The weather is") == "<s>The weather is"


def test_chat_loop_raw_keeps_no_history(model_and_tok):
    import io

    model, tok = model_and_tok
    inputs = iter(["The weather is", "Fine-tuning", "/exit"])
    out = io.StringIO()
    history = chat_loop(
        model, tok, max_new_tokens=3, temperature=0.0, input_fn=lambda _: next(inputs), output=out, raw=True
    )
    assert history == [] and out.getvalue().count("model> ") == 2


def test_chat_with_a_single_turn_adapter_answers_each_message_on_its_own(dolly_ja_model, tiny_tokenizer, monkeypatch):
    import io

    import lorafuse.infer.chat as chat

    seen = []
    monkeypatch.setattr(chat, "generate", lambda model, tok, messages, **kw: seen.append(list(messages)) or "ok")
    inputs = iter(["日本の首都は？", "富士山は？", "/exit"])
    out = io.StringIO()
    history = chat_loop(dolly_ja_model, tiny_tokenizer, input_fn=lambda _: next(inputs), output=out)
    assert "single-turn dolly-ja rows" in out.getvalue() and history == []
    assert seen == [[{"role": "user", "content": "日本の首都は？"}], [{"role": "user", "content": "富士山は？"}]]

"""generate(): chat template for messages, stops at EOS / end-of-turn, greedy and sampling."""

from __future__ import annotations

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
        new = _generated_ids(model, lambda: generate(model, tok, prompt, max_new_tokens=40))
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

"""Text generation with a (LoRA-adapted) causal LM.

`generate(model, tokenizer, prompt_or_messages)`: a string is tokenized as plain text (BOS added as the tokenizer
does); a list of `{"role", "content"}` messages goes through the tokenizer's chat template with the generation
prompt, exactly as chat training rendered it. Generation stops at EOS and at the chat template's end-of-turn token
(e.g. `<|im_end|>`, `<|eot_id|>`), which fine-tuned chat models emit before (or instead of) EOS.
temperature 0 is greedy; temperature > 0 samples with top-p / top-k.
"""

from __future__ import annotations

import torch

from lorafuse.errors import LorafuseError

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config and the tokenizer, plus known end-of-turn tokens in the vocabulary."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    ids.extend(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab and t in template)
    return sorted(set(int(i) for i in ids))


def encode_prompt(tokenizer, prompt_or_messages) -> list[int]:
    if isinstance(prompt_or_messages, str):
        return tokenizer(prompt_or_messages)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise LorafuseError(
            "messages were given but the tokenizer has no chat template",
            "pass a plain string prompt, or use a model whose tokenizer defines a chat template",
        )
    out = tokenizer.apply_chat_template(
        list(prompt_or_messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_or_messages,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stream: bool = False,
) -> str:
    """Generate a completion and return only the new text (special tokens removed)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise LorafuseError(
            f"invalid sampling settings temperature={temperature}, top_p={top_p}",
            "use temperature >= 0 (0 = greedy) and 0 < top_p <= 1",
        )
    ids = encode_prompt(tokenizer, prompt_or_messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = temperature > 0
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

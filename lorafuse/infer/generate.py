"""Text generation with a (LoRA-adapted) causal LM, prompted the way the adapter was trained.

`generate(model, tokenizer, prompt)`: a string is the user message and a list of `{"role", "content"}` messages is
a conversation; either is rendered with the chat template the adapter was trained with (`model_state(model).prompt`,
from the adapter's lorafuse.json: a plain format such as dolly-ja as its equivalent Jinja, see
lorafuse.data.templates), else the tokenizer's own chat template, with the generation prompt, exactly as training
rendered it. The trained system prompt is put in when the conversation has no system message. A user message may
carry an `input` (the Input block of alpaca-like formats; folded into the message after a blank line for other
templates, as chat training folded it). A string with no chat template anywhere (a base model) is sent as written,
and `raw=True` always sends the string as written (the tokenizer adds BOS as it does for any text).

Generation stops at EOS (the tokenizer's, the generation config's, the trained one) and at the chat template's
end-of-turn token (e.g. `<|im_end|>`, `<|eot_id|>`), which fine-tuned chat models emit before (or instead of) EOS.
temperature 0 is greedy; temperature > 0 samples with top-p / top-k.
"""

from __future__ import annotations

import torch

from lorafuse.errors import LorafuseError
from lorafuse.model_state import model_state

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _format(model):
    return model_state(model).prompt if model is not None else None


def chat_template_of(model, tokenizer) -> str | None:
    """The Jinja a prompt is rendered with: the trained one (model_state(model).prompt), else the tokenizer's."""
    fmt = _format(model)
    return (fmt.chat_template if fmt is not None else None) or getattr(tokenizer, "chat_template", None)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config, the tokenizer and the trained format, plus known end-of-turn tokens the
    chat template writes."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    vocab = tokenizer.get_vocab()
    fmt = _format(model)
    if fmt is not None and fmt.eos_token in vocab:
        ids.append(vocab[fmt.eos_token])
    template = chat_template_of(model, tokenizer) or ""
    ids.extend(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab and t in template)
    return sorted(set(int(i) for i in ids))


def prompt_note(model, tokenizer, adapter_dir=None) -> str | None:
    """One line for the user when prompts are not rendered the way lorafuse recorded training, else None."""
    fmt = _format(model)
    if fmt is not None and fmt.source != "tokenizer":
        return None
    template = chat_template_of(model, tokenizer)
    if adapter_dir is not None:
        how = (
            f"rendered with the {'adapter' if fmt is not None else 'base model'}'s tokenizer chat template"
            if template
            else "sent as written (no chat template either)"
        )
        return f"note: {adapter_dir} has no lorafuse.json (not written by lorafuse): the prompt is {how}"
    if template is None:
        return "note: the model's tokenizer has no chat template: the prompt is sent as written"
    return None


def user_message(text: str, input: str | None = None) -> dict:
    """A user message; `input` is the Input block of alpaca-like formats (rendered by the trained template)."""
    return {"role": "user", "content": text, **({"input": input} if input else {})}


def encode_prompt(tokenizer, prompt_or_messages, model=None, raw: bool = False) -> list[int]:
    """The prompt's token ids (module docstring); `model` carries the trained prompt format, if any."""
    template = chat_template_of(model, tokenizer)
    if isinstance(prompt_or_messages, str) and (raw or template is None):
        return tokenizer(prompt_or_messages)["input_ids"]
    if raw:
        raise LorafuseError("raw=True takes a string prompt, not a list of messages", "pass the text itself")
    messages = [user_message(prompt_or_messages)] if isinstance(prompt_or_messages, str) else list(prompt_or_messages)
    if template is None:
        raise LorafuseError(
            "messages were given but neither the adapter nor the tokenizer has a chat template",
            "pass a plain string prompt, or use a model whose tokenizer defines a chat template",
        )
    fmt = _format(model)
    if fmt is not None and fmt.system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    if fmt is None or fmt.template != "plain":  # chat training put the input into the user message
        messages = [_fold_input(m) for m in messages]
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def _fold_input(message: dict) -> dict:
    if not message.get("input"):
        return message
    folded = {k: v for k, v in message.items() if k != "input"}
    return {**folded, "content": f"{message['content']}\n\n{message['input']}"}


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
    raw: bool = False,
) -> str:
    """Generate a completion and return only the new text (special tokens removed); see the module docstring."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise LorafuseError(
            f"invalid sampling settings temperature={temperature}, top_p={top_p}",
            "use temperature >= 0 (0 = greedy) and 0 < top_p <= 1",
        )
    ids = encode_prompt(tokenizer, prompt_or_messages, model, raw=raw)
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

"""An interactive chat loop (`lorafuse chat`), prompted the way the adapter was trained.

Keeps the conversation as messages; each turn is rendered with the trained chat template (lorafuse.infer.generate:
the adapter's lorafuse.json, else the tokenizer's template, the trained system prompt unless one is given) and the
reply is printed. An adapter trained on single-turn rows (a plain template of alpaca, dolly, dolly-ja,
prompt-completion or text) never saw a conversation, so each message is answered on its own, as trained, and the
banner says so. `raw=True` keeps no history and sends each line as written (text completion). Commands: `/reset`
clears the history, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys

from lorafuse.infer.generate import generate
from lorafuse.model_state import model_state

_CONVERSATION_FORMATS = ("sharegpt", "messages", "preference")


def single_turn(model) -> bool:
    """Whether the adapter was trained on single-turn rows only (module docstring)."""
    fmt = model_state(model).prompt
    return fmt is not None and fmt.template == "plain" and fmt.format not in (None, *_CONVERSATION_FORMATS)


def chat_loop(
    model,
    tokenizer,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    input_fn=input,
    output=sys.stdout,
    raw: bool = False,
) -> list[dict]:
    """Run the REPL until /exit or EOF; returns the final message history."""
    messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    alone = not raw and single_turn(model)
    if raw:
        what = "each line is sent as written"
    elif alone:
        trained = model_state(model).prompt.format
        what = f"the adapter was trained on single-turn {trained} rows, so each message is answered on its own"
    else:
        what = "/reset clears the history"
    print(f"chat: type a message; {what}; /exit quits", file=output)
    while True:
        try:
            text = input_fn("you> ")
        except EOFError:
            break
        text = text.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if system_prompt else []
            print("(history cleared)", file=output)
            continue
        if not text:
            continue
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        if raw:
            print(f"model> {generate(model, tokenizer, text, raw=True, **sampling)}", file=output)
            continue
        messages.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, messages, **sampling)
        print(f"assistant> {reply}", file=output)
        if alone:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})
    return messages

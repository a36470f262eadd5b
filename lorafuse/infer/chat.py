"""An interactive chat loop over the tokenizer's chat template (`lorafuse chat`).

Keeps the conversation as messages; each turn is rendered with the template (as in training) and the reply is
streamed. Commands: `/reset` clears the history, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys

from lorafuse.infer.generate import generate


def chat_loop(
    model,
    tokenizer,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    input_fn=input,
    output=sys.stdout,
) -> list[dict]:
    """Run the REPL until /exit or EOF; returns the final message history."""
    messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    print("chat: type a message; /reset clears the history, /exit quits", file=output)
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
        messages.append({"role": "user", "content": text})
        reply = generate(
            model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
        )
        print(f"assistant> {reply}", file=output)
        messages.append({"role": "assistant", "content": reply})
    return messages

"""An Ollama Modelfile for an exported GGUF file: FROM, TEMPLATE (the chat template training used, as a Go template),
PARAMETER stop (EOS and the end-of-turn token), SYSTEM (the system prompt training used, if any).

The Jinja chat template is translated by rendering it, not by parsing it. It is rendered on probe conversations with
unique texts, and the text around the probes gives the literal pieces of each role:

    [user U]                 + generation prompt  ->  P + pre_user + U + gen
    [user U, assistant A]                         ->  P + pre_user + U + between + A + after
    [user U, assistant A, user V] + gen prompt    ->  ... A + after + pre_user + V + gen
    [system S, user U]       + generation prompt  ->  P + pre_system + S + after_system + pre_user + U + gen

P is what the template writes first (BOS, dropped when the tokenizer adds BOS itself, as llama.cpp/Ollama then do).
The Go template writes those pieces around .System and each message's .Content (range over .Messages; system
messages come through .System, which Ollama fills from SYSTEM and from system messages), and `gen` after the last user
message. Before anything is written, the same pieces are put together in Python for every probe conversation and
compared with the Jinja rendering: a template whose text depends on more than role and content (a system prompt folded
into the first user turn, first-turn special cases, rewritten content) fails that comparison, and the export stops
with an error instead of writing a Modelfile that prompts the model differently from training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafuse.atomic import write_atomic
from lorafuse.errors import LorafuseError
from lorafuse.version import __version__

HEADER = "# Modelfile written by lorafuse"
_PROBE = "lorafuse-probe-{}"


@dataclass(frozen=True)
class RolePieces:
    """The literal text of a chat template around each role's content (see module docstring)."""

    prefix: str  # P: before the first message
    system: tuple[str, str] | None  # (pre_system, after_system); None: the template has no system role
    user: str  # pre_user
    gen: str  # after the last user message: the generation prompt
    between: str  # after a user message, before the assistant's reply
    after: str  # after an assistant reply (its end-of-turn / EOS)

    def compose(self, messages: list[dict]) -> str:
        """What the Go template renders for `messages` (ending with a user message), in Python."""
        out = [self.prefix]
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system and self.system:
            out += [self.system[0], "\n\n".join(system), self.system[1]]
        turns = [m for m in messages if m["role"] != "system"]
        for i, m in enumerate(turns):
            last = i == len(turns) - 1
            if m["role"] == "user":
                out += [self.user, m["content"], self.gen if last else ""]
            else:
                out += [self.between, m["content"], "" if last else self.after]
        return "".join(out)


def role_pieces(tokenizer, template: str) -> RolePieces:
    """`template` (rendered with `tokenizer`'s special tokens) as RolePieces, verified on probe conversations."""
    u, a, v, s = (_PROBE.format(x) for x in ("user-1", "reply-1", "user-2", "system"))

    def render(messages, gen=True):
        kw = dict(chat_template=template, tokenize=False, add_generation_prompt=gen)
        return tokenizer.apply_chat_template(messages, **kw)

    one = [{"role": "user", "content": u}]
    pair = one + [{"role": "assistant", "content": a}]
    two = pair + [{"role": "user", "content": v}]
    try:
        r1, r2, r3 = render(one), render(pair, gen=False), render(two)
        head, gen = _around(r1, u)
        between, after = _around(_around(r2, u)[1], a)
        pre_user = _strip_prefix(_around(_around(r3, a)[1], v)[0], after)
        prefix = _strip_suffix(head, pre_user)
    except Exception as exc:  # _NoMatch, or the template itself raising on this conversation
        raise _untranslatable(template, str(exc)) from None
    system = None
    with_system = [{"role": "system", "content": s}] + one
    try:
        r4 = render(with_system)
    except Exception:  # the template rejects a system message: Ollama's SYSTEM cannot be honoured
        r4 = None
    if r4 is not None and s in r4:
        try:
            before, rest = _around(r4, s)
            system = (_strip_prefix(before, prefix), _strip_suffix(_around(rest, u)[0], pre_user))
        except _NoMatch as exc:
            raise _untranslatable(template, str(exc)) from None
    pieces = RolePieces(prefix, system, pre_user, gen, between, after)
    checks = [one, two] + ([with_system, [{"role": "system", "content": s}] + two] if system else [])
    for messages in checks:
        if pieces.compose(messages) != render(messages):
            raise _untranslatable(template, f"its text for {[m['role'] for m in messages]} depends on more than roles")
    return pieces


class _NoMatch(ValueError):
    pass


def _around(text: str, probe: str) -> tuple[str, str]:
    if text.count(probe) != 1:
        raise _NoMatch(f"the message text {probe!r} appears {text.count(probe)} times in the rendering, not once")
    before, _, after = text.partition(probe)
    return before, after


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise _NoMatch(f"{text!r} does not start with {prefix!r}")
    return text[len(prefix) :]


def _strip_suffix(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise _NoMatch(f"{text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)]


def _untranslatable(template: str, why: str) -> LorafuseError:
    return LorafuseError(
        f"the chat template cannot be translated into an Ollama template ({why}); a guessed one would prompt the "
        "model differently from training, so no Modelfile was written",
        "drop --ollama and write the Modelfile's TEMPLATE by hand (the GGUF file holds the Jinja template in "
        "tokenizer.chat_template, which llama.cpp and LM Studio use directly)",
    )


def go_template(pieces: RolePieces) -> str:
    """The Ollama (Go text/template) TEMPLATE for `pieces`. `{{-` trims the text before it, so it only ever follows
    the template's own line breaks, never a literal piece; a piece containing braces is written as a quoted string."""
    lines = ["{{ " + json.dumps(pieces.prefix, ensure_ascii=False) + " }}" if pieces.prefix else ""]
    if pieces.system:
        pre, after = pieces.system
        lines.append("{{- if .System }}" + _lit(pre) + "{{ .System }}" + _lit(after) + "{{ end }}")
    lines += [
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "user" }}'
        + _lit(pieces.user)
        + "{{ .Content }}{{ if $last }}"
        + _lit(pieces.gen)
        + "{{ end }}",
        '{{- else if eq .Role "assistant" }}'
        + _lit(pieces.between)
        + "{{ .Content }}{{ if not $last }}"
        + _lit(pieces.after)
        + "{{ end }}",
        "{{- end }}",
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


def _lit(text: str) -> str:
    if "{{" in text or "}}" in text or '"""' in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def modelfile_text(gguf_name: str, tokenizer, template: str | None, system_prompt: str | None, eot_id) -> str:
    """The Modelfile for the GGUF file `gguf_name` (a path relative to the Modelfile)."""
    if not template:
        raise LorafuseError(
            "the model has no chat template, so Ollama would send prompts verbatim",
            "train with a chat or plain template (lorafuse records it in the adapter), or drop --ollama",
        )
    pieces = role_pieces(tokenizer, template)
    bos = tokenizer.bos_token
    if bos and pieces.prefix == bos and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        pieces = RolePieces("", pieces.system, pieces.user, pieces.gen, pieces.between, pieces.after)
    if system_prompt and pieces.system is None:
        raise LorafuseError(
            "training used a system prompt, but the chat template has no system role to put it in",
            "drop --ollama, or train with a template that has a system role",
        )
    stops = [tokenizer.eos_token] + ([tokenizer.convert_ids_to_tokens(eot_id)] if eot_id is not None else [])
    lines = [
        f"{HEADER} {__version__}. Create the model with: ollama create {Path(gguf_name).stem} -f <this file>",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{go_template(pieces)}"""',
        *(f"PARAMETER stop {json.dumps(t, ensure_ascii=False)}" for t in dict.fromkeys(stops) if t),
    ]
    if system_prompt:
        if '"""' in system_prompt:
            raise LorafuseError('the system prompt contains """, which a Modelfile cannot quote', "drop --ollama")
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """Where the Modelfile of `gguf_path` goes: "<gguf stem>.Modelfile" beside it. Refuses (before any work) an
    existing file lorafuse did not write (lorafuse.outputs)."""
    from lorafuse.outputs import check_output_file

    def ours(path: Path) -> bool:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(HEADER)

    return check_output_file(gguf_path.with_suffix(".Modelfile"), "export", ours, what="the Modelfile")


def write_modelfile(gguf_path: Path, text: str) -> Path:
    """Write `text` (modelfile_text) as the Modelfile of the GGUF file at `gguf_path` (modelfile_path), atomically."""
    path = modelfile_path(gguf_path)
    write_atomic(path, text)
    return path

"""Ollama Modelfile: its text for the chat and plain templates lorafuse trains with, refusal of templates it cannot
translate, and (where Go is installed) Go's text/template rendering the TEMPLATE exactly as Jinja renders the chat
template for the same conversation, the way Ollama calls it (.System, .Messages)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from tiny_trained import LLAMA3_TEMPLATE, QWEN2_TEMPLATE, byte_level_tokenizer

from lorafuse.artifacts.ollama import HEADER, go_template, modelfile_text, role_pieces
from lorafuse.errors import LorafuseError
from lorafuse.model.tiny import CHAT_TEMPLATE

# The plain dolly-ja prompt format (lorafuse.data.formats) as a chat template: system text, then 指示 / 回答 blocks,
# EOS after each answer.
DOLLY_JA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### 指示:\n' + m['content'] + '\n\n' }}"
    "{% else %}{% generation %}{{ '### 回答:\n' + m['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### 回答:\n' }}{% endif %}"
)
LLAMA2 = (  # Llama-2 chat: the system prompt goes inside the first [INST], so no per-role pieces exist
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def _modelfile(tokenizer, template, system=None, eot="<|im_end|>"):
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    return modelfile_text("model-q8_0.gguf", tokenizer, template, system, eot_id)


def test_chatml_modelfile(tiny_tokenizer):
    text = _modelfile(tiny_tokenizer, CHAT_TEMPLATE, system="Answer briefly.")
    lines = text.splitlines()
    assert lines[0].startswith(HEADER) and lines[1] == "FROM ./model-q8_0.gguf"
    assert 'PARAMETER stop "</s>"' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert lines[-1] == 'SYSTEM """Answer briefly."""'
    template = text.partition('TEMPLATE """')[2].partition('"""')[0]
    assert "<|im_start|>system\n{{ .System }}<|im_end|>\n" in template
    assert "<|im_start|>user\n{{ .Content }}" in template
    assert "<|im_end|>\n<|im_start|>assistant\n" in template  # the generation prompt after the last user turn
    assert "<s>" not in template  # BOS: llama.cpp adds it (tokenizer.ggml.add_bos_token), the template must not


def test_plain_dolly_ja_modelfile(tiny_tokenizer):
    text = _modelfile(tiny_tokenizer, DOLLY_JA, system="丁寧に答えてください。", eot=None)
    template = text.partition('TEMPLATE """')[2].partition('"""')[0]
    assert "### 指示:\n{{ .Content }}" in template and "\n\n### 回答:\n" in template
    assert "{{ .System }}\n\n" in template
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == ['PARAMETER stop "</s>"']
    assert 'SYSTEM """丁寧に答えてください。"""' in text


def test_templates_it_cannot_translate_are_refused(tiny_tokenizer):
    with pytest.raises(LorafuseError, match="cannot be translated"):
        _modelfile(tiny_tokenizer, LLAMA2)
    rewrites = CHAT_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(LorafuseError, match="cannot be translated"):
        _modelfile(tiny_tokenizer, rewrites)
    no_system = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(LorafuseError, match="no system role"):
        _modelfile(
            tiny_tokenizer,
            no_system.replace(
                "{% for", "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% for"
            ),
            system="Be brief.",
            eot=None,
        )


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var in struct {
		Template string
		System   string
		Messages []*Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, messages) with Go's text/template, given the data Ollama gives it."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go): Go template rendering not checked")
    folder = tmp_path_factory.mktemp("go")
    (folder / "render.go").write_text(GO_RENDER)
    subprocess.run(["go", "build", "-o", "render", "render.go"], cwd=folder, check=True, capture_output=True)

    def render(template, messages, system_in_messages=True):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        shown = [m for m in messages if system_in_messages or m["role"] != "system"]
        data = json.dumps(
            {
                "Template": template,
                "System": system,
                "Messages": [{"Role": m["role"], "Content": m["content"]} for m in shown],
            }
        )
        return subprocess.run([str(folder / "render")], input=data, capture_output=True, text=True, check=True).stdout

    return render


CONVERSATIONS = [
    [{"role": "user", "content": "日本の首都は?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\nHow are you?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one."},
    ],
]


@pytest.mark.parametrize("style", ["chatml", "dolly-ja", "llama3", "qwen2"])
def test_go_renders_the_template_as_jinja_does(go_render, tiny_tokenizer, style):
    tokenizer, template = {
        "chatml": (tiny_tokenizer, CHAT_TEMPLATE),
        "dolly-ja": (tiny_tokenizer, DOLLY_JA),
        "llama3": (byte_level_tokenizer("llama3"), LLAMA3_TEMPLATE),
        "qwen2": (byte_level_tokenizer("qwen2"), QWEN2_TEMPLATE),
    }[style]
    pieces = role_pieces(tokenizer, template)
    go = go_template(pieces)
    for messages in CONVERSATIONS:
        jinja = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        for system_in_messages in (True, False):  # Ollama versions differ on this; the TEMPLATE reads .System
            assert go_render(go, messages, system_in_messages) == jinja, messages

"""An adapter knows how it was trained: train the tiny model on dolly-ja rows, then `lorafuse generate --prompt
<instruction>` answers in the trained style and stops at EOS, with no template written by hand; the merged model
does the same; a peft adapter (no lorafuse.json) falls back to the tokenizer's template with a note; the adapter's
card runs as printed; every file is written with the umask's mode; no third-party progress bar in the output."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pytest

from lorafuse.cli import main
from lorafuse.data.templates import plain_chat_template

ANSWER = "かしこまりました。"
INSTRUCTIONS = [
    "日本の首都はどこですか？",
    "富士山の高さを教えてください。",
    "好きな色は何ですか？",
    "今日の天気はどうですか？",
    "おすすめの本を教えてください。",
    "猫と犬、どちらが好きですか？",
    "朝ごはんは何を食べましたか？",
    "週末の予定を教えてください。",
]
HELD_OUT = "明日の予定を教えてください。"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the built-in tiny Llama on dolly-ja rows whose every answer is ANSWER."""
    root = tmp_path_factory.mktemp("trained-format")
    env = pytest.MonkeyPatch()
    env.setenv("LORAFUSE_CACHE", str(root / "cache"))
    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"instruction": i, "output": ANSWER}, ensure_ascii=False) + "\n" for i in INSTRUCTIONS * 4)
    )
    argv = [
        "train",
        "model.path=builtin:tiny-llama",
        "data.format=dolly-ja",
        f"data.path={rows}",
        "data.val_size=0",
        "train.max_steps=100",
        "train.eval_every=null",
        "train.early_stopping_patience=null",
        "train.save_every=100",
        f"output.dir={root / 'run'}",
    ]
    assert main(argv) == 0
    yield root
    env.undo()


def _generate(capsys, *argv) -> tuple[str, str]:
    assert main(["generate", *argv, "--max-new-tokens", "48"]) == 0
    out = capsys.readouterr()
    return out.out.rstrip("\n"), out.err


def test_generate_answers_in_the_trained_format_and_stops_at_eos(trained, capsys):
    adapter = trained / "run" / "adapter"
    answer, err = _generate(capsys, "--model", "builtin:tiny-llama", "--adapter", str(adapter), "--prompt", HELD_OUT)
    assert answer == ANSWER  # the trained reply and nothing after it: generation stopped at EOS
    assert "note:" not in err and "Loading weights" not in err
    raw, _ = _generate(
        capsys, "--model", "builtin:tiny-llama", "--adapter", str(adapter), "--prompt", HELD_OUT, "--raw"
    )
    assert raw != ANSWER  # the same text without the trained template is not what the adapter learned to answer


def test_the_adapter_records_its_format_and_carries_the_template(trained):
    adapter = trained / "run" / "adapter"
    facts = json.loads((adapter / "lorafuse.json").read_text(encoding="utf-8"))
    template = plain_chat_template("dolly-ja", bos=True)
    assert {k: facts[k] for k in ("format", "template", "system_prompt", "eos_token", "chat_template")} == {
        "format": "dolly-ja",
        "template": "plain",
        "system_prompt": None,
        "eos_token": "</s>",
        "chat_template": template,
    }
    assert facts["base_model"] == "builtin:tiny-llama" and facts["lorafuse_version"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(adapter)).chat_template == template


def test_a_peft_adapter_falls_back_to_the_tokenizers_template_with_a_note(trained, tmp_path, capsys):
    peft_like = tmp_path / "peft-adapter"
    shutil.copytree(trained / "run" / "adapter", peft_like)
    (peft_like / "lorafuse.json").unlink()
    answer, err = _generate(
        capsys, "--model", "builtin:tiny-llama", "--adapter", str(peft_like), "--quant", "none", "--prompt", HELD_OUT
    )
    note = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "has no lorafuse.json" in note[0] and "adapter's tokenizer chat template" in note[0]
    assert answer == ANSWER  # its tokenizer carries the trained template


def test_the_merged_model_prompts_the_same_way(trained, capsys):
    merged = trained / "merged"
    adapter = trained / "run" / "adapter"
    assert main(["merge", "--model", "builtin:tiny-llama", "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    facts = json.loads((merged / "lorafuse.json").read_text(encoding="utf-8"))
    assert facts["format"] == "dolly-ja" and facts["chat_template"] == plain_chat_template("dolly-ja", bos=True)
    answer, _ = _generate(capsys, "--model", str(merged), "--quant", "none", "--prompt", HELD_OUT)
    assert answer == ANSWER


def test_every_file_is_written_with_the_umasks_mode(trained):
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    folders = [trained / "run" / "adapter", *sorted((trained / "run").glob("checkpoint-*")), trained / "merged"]
    files = [p for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != expected}
    assert not wrong, f"expected {oct(expected)}"


def test_the_adapter_card_runs_as_printed(trained):
    pytest.importorskip("peft")
    card = (trained / "run" / "adapter" / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "builtin:" not in code  # transformers cannot read lorafuse's builtin names: the card names the folder
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert type(namespace["model"]).__name__.startswith("Peft") and namespace["tokenizer"].chat_template
    command = re.search(r"```bash\n(.*?)```", card, re.S).group(1).strip()
    assert command.startswith("lorafuse generate --model") and str(trained / "run" / "adapter") in command

"""`lorafuse data preview`: rendered examples with trained/masked tokens, EOS markers, statistics."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rich.console import Console

from lorafuse.config import DataConfig
from lorafuse.preview import histogram_lines, preview, render_example


def _cfg(tmp_path, model_path="unused", train_untrained_tokens="auto", modules_to_save=None, **data):
    return SimpleNamespace(
        model=SimpleNamespace(path=str(model_path), trust_remote_code=False),
        lora=SimpleNamespace(
            train_untrained_tokens=train_untrained_tokens, token_row_init="sample", modules_to_save=modules_to_save
        ),
        data=DataConfig(**{"path": "builtin:demo", **data}),
        output=SimpleNamespace(dir=str(tmp_path / "run")),
        train=SimpleNamespace(seed=42),
    )


def test_preview_prints_examples_markers_and_stats(tiny_tokenizer, tmp_path):
    console = Console(record=True, width=100, color_system=None)
    stats = preview(_cfg(tmp_path, num_rows=20), n=2, console=console, tokenizer=tiny_tokenizer)
    text = console.export_text()
    assert text.count("example ") == 2 and "[BOS]" in text and text.count("[EOS]") >= 3  # 2 examples + legend
    assert "### Instruction:" in text and "20 read" in text and "masked" in text and "█" in text
    assert "cache: miss" in text and (tmp_path / "run" / ".cache").is_dir()  # default cache under output.dir
    again = Console(record=True, width=100, color_system=None)
    assert preview(_cfg(tmp_path, num_rows=20), n=1, console=again, tokenizer=tiny_tokenizer).cache_hit
    assert stats.rows_read == 20


def test_preview_loads_the_models_tokenizer(tiny_model_dir, tmp_path):
    console = Console(record=True, width=100, color_system=None)
    preview(_cfg(tmp_path, model_path=tiny_model_dir, num_rows=5), n=1, console=console)
    assert "[EOS]" in console.export_text()


def test_preview_reports_untrained_token_rows_from_the_checkpoint(tiny_tokenizer, tmp_path):
    import torch

    from lorafuse.model.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer=tiny_tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight[[4, 5]] = 0  # <|im_start|>, <|im_end|>, as in Llama-3 base
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Red."}]}] * 3
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode, says in (("auto", "lorafuse trains their embedding"), ("off", "lora.train_untrained_tokens=off")):
        console = Console(record=True, width=300, color_system=None)
        cfg = _cfg(tmp_path, tmp_path / "base", mode, path=str(tmp_path / "chat.jsonl"), format="messages")
        preview(cfg, n=1, console=console)
        text = console.export_text()
        assert "untrained token rows: 2 of the" in text and "'<|im_end|>' (id 5): embedding all zero" in text
        assert says in text and "trained whole" not in text
    console = Console(record=True, width=300, color_system=None)
    chat = {"path": str(tmp_path / "chat.jsonl"), "format": "messages"}
    cfg = _cfg(tmp_path, tmp_path / "base", "auto", ["embed_tokens"], **chat)
    preview(cfg, n=1, console=console)
    assert "the embedding is trained whole (lora.modules_to_save)" in console.export_text()


def test_preview_without_local_weights_says_the_run_checks(tiny_tokenizer, tmp_path):
    console = Console(record=True, width=300, color_system=None)
    preview(_cfg(tmp_path, "someone/some-model", num_rows=3), n=1, console=console, tokenizer=tiny_tokenizer)
    assert "untrained token rows: not checked before training" in console.export_text()


def test_render_styles_trained_masked_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok("### Response:\n")["input_ids"]
    target = tok("Red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = prompt + target
    labels = [-100] * len(prompt) + target
    text = render_example(ids, labels, tok)
    styled = {(text.plain[s.start : s.end], str(s.style)) for s in text.spans}
    assert ("Red.", "bold green") in styled
    assert ("[EOS]", "bold black on green") in styled
    assert ("### Response:\n", "dim") in styled
    masked_eos = render_example(ids, labels[:-1] + [-100], tok)
    assert ("[EOS]", "bold white on red") in {
        (masked_eos.plain[s.start : s.end], str(s.style)) for s in masked_eos.spans
    }


def test_histogram_bars_scale_to_the_largest_bin():
    lines = histogram_lines([(16, 32, 5), (32, 64, 20), (64, 128, 0)])
    assert [line.count("█") for line in lines] == [8, 30, 0]
    assert lines[1].rstrip().endswith("20") and "32-63" in lines[1]

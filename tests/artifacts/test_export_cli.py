"""`lorafuse export` from the command line: help names every type, bad requests exit 2 with the reason, and a run
writes the GGUF file (+ Modelfile) or the merged folder and reports size and time."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

import lorafuse  # noqa: E402
from lorafuse.artifacts.gguf_tensors import QUANT_TYPES  # noqa: E402
from lorafuse.cli import main  # noqa: E402


def test_help_names_every_type(capsys):
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "lorafuse export --model" in out and "llama-quantize" in out
    for name in QUANT_TYPES:
        assert f"  {name} " in out


def test_gguf_with_ollama_reports_size_and_time(trained, tmp_path, capsys):
    t = trained("llama")
    out = tmp_path / "chat-q8_0.gguf"
    args = ["export", "--model", str(t.base), "--adapter", str(t.adapter), "--out", str(out), "--quant", "q8_0"]
    assert main(args + ["--ollama"]) == 0
    assert out.is_file() and (tmp_path / "chat-q8_0.Modelfile").read_text().splitlines()[1] == "FROM ./chat-q8_0.gguf"
    err = capsys.readouterr().err
    assert "KiB, q8_0) in" in err and "ollama create" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-q8_0.Modelfile", "chat-q8_0.gguf"]  # no temp left


def test_hf_format_writes_the_merged_folder(trained, tmp_path):
    t = trained("llama")
    assert (
        main(
            [
                "export",
                "--model",
                str(t.base),
                "--adapter",
                str(t.adapter),
                "--out",
                str(tmp_path / "m"),
                "--format",
                "hf",
                "--quant",
                "f16",
            ]
        )
        == 0
    )
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--format", "hf", "--lora-only"], "GGUF options"),
        (["--format", "hf", "--quant", "q8_0"], "16/32-bit"),
        (["--lora-only", "--ollama"], "not for a LoRA adapter"),
        (["--lora-only", "--quant", "q4_0"], "f32, f16, bf16 or q8_0"),
    ],
)
def test_bad_combinations_exit_2(trained, tmp_path, capsys, extra, message):
    t = trained("llama")
    out = tmp_path / "x.gguf"
    assert main(["export", "--model", str(t.base), "--adapter", str(t.adapter), "--out", str(out)] + extra) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_foreign_file_is_never_replaced(trained, tmp_path, capsys):
    t = trained("llama")
    out = tmp_path / "notes.gguf"
    out.write_text("mine")
    assert main(["export", "--model", str(t.base), "--adapter", str(t.adapter), "--out", str(out)]) == 2
    assert "not written by lorafuse" in capsys.readouterr().err and out.read_text() == "mine"
    modelfile = tmp_path / "m.Modelfile"
    modelfile.write_text("FROM llama3\n")
    args = ["export", "--model", str(t.base), "--adapter", str(t.adapter), "--out", str(tmp_path / "m.gguf")]
    assert main(args + ["--ollama"]) == 2
    assert modelfile.read_text() == "FROM llama3\n" and not (tmp_path / "m.gguf").exists()


def test_unknown_type_is_an_argument_error(capsys):
    assert main(["export", "--model", "m", "--out", "x.gguf", "--quant", "q4_k_m"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_api_is_the_same_function():
    from lorafuse.artifacts.export import export

    assert lorafuse.export is export


def test_export_without_the_gguf_package_names_the_extra(monkeypatch, capsys, tmp_path):
    """No `gguf` installed: one clear error with the pip command, exit 2, before anything is loaded or written."""
    import builtins

    real = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    from lorafuse.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "--model", "builtin:tiny-llama", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs the `gguf` package" in err and "pip install 'lorafuse[export]'" in err and "Traceback" not in err
    assert not out.exists()

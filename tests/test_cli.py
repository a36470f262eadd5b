"""CLI: help with examples, wiring of each command to its function, error reporting, fast startup."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import DataError, ModelError

ROOT = Path(__file__).resolve().parents[1]

HELP_COMMANDS = [
    ["train"],
    ["data"],
    ["data", "preview"],
    ["generate"],
    ["chat"],
    ["merge"],
    ["env"],
    ["plan"],
    ["bench"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_every_subcommand_help_has_an_example(command, capsys):
    assert main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"lorafuse {' '.join(command)}" in out


def test_top_level_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    assert main([]) == 2


def fake_module(monkeypatch, name, **attrs):
    """Put a recording stand-in for `name` in sys.modules (the real one may not exist yet)."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def record():
    calls = []

    def make(result=None):
        def fn(*args, **kwargs):
            calls.append((args, kwargs))
            return result

        return fn

    make.calls = calls
    return make


@pytest.fixture(autouse=True)
def no_hub_check(monkeypatch):
    """The wiring tests use made-up hub ids; tests/test_hub.py checks what the CLI does with real ones."""
    monkeypatch.setattr("lorafuse.hub.check_hub_ids", lambda sources: None)
    monkeypatch.setattr("lorafuse.infer.generate.prompt_note", lambda model, tokenizer, adapter=None: None)


def write_cfg(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: some/model\ndata:\n  path: d.jsonl\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "flags, resume, force",
    [
        ([], "auto", False),
        (["--resume", "runs/x/checkpoint-10"], "runs/x/checkpoint-10", False),
        (["--no-resume", "--force"], None, True),
    ],
)
def test_train_calls_run_with_config_and_resume(tmp_path, monkeypatch, record, flags, resume, force):
    fake_module(monkeypatch, "lorafuse.job", run=record())
    cfg_path = write_cfg(tmp_path)
    # an override after an option still counts as an override
    assert main(["train", str(cfg_path), "lora.r=8"] + flags + ["train.lr=1e-3"]) == 0
    (cfg,), kwargs = record.calls[0]
    assert (cfg.model.path, cfg.lora.r, cfg.train.lr) == ("some/model", 8, 1e-3)
    assert kwargs == {"resume": resume, "force": force}


def test_train_without_config_runs_the_demo(monkeypatch, record):
    fake_module(monkeypatch, "lorafuse.job", run=record())
    assert main(["train", "train.max_steps=5"]) == 0
    (cfg,), _ = record.calls[0]
    assert cfg.model.path == "builtin:tiny-llama" and cfg.train.max_steps == 5


def test_resume_and_no_resume_are_exclusive(capsys):
    assert main(["train", "--resume", "x", "--no-resume"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_data_preview_and_plan_are_wired(tmp_path, monkeypatch, record):
    fake_module(monkeypatch, "lorafuse.preview", preview=record())
    fake_module(monkeypatch, "lorafuse.plan.cli", plan_command=record(result=3))
    cfg_path = write_cfg(tmp_path)
    assert main(["data", "preview", str(cfg_path), "-n", "2", "data.max_length=64"]) == 0
    (cfg,), kwargs = record.calls[0]
    assert cfg.data.max_length == 64 and kwargs == {"n": 2}
    assert main(["plan", str(cfg_path), "--gpu-memory", "15GiB", "--json"]) == 3  # the plan's own status
    _, kwargs = record.calls[1]
    command = f"lorafuse train {cfg_path}"  # what the suggestion extends: runnable as printed
    assert kwargs == {"gpu_memory": "15GiB", "as_json": True, "train_command": command}
    assert main(["plan", str(cfg_path), "--gpu", "T4", "lora.r=4"]) == 3
    assert record.calls[2][1] == {
        "gpu_memory": None,
        "as_json": False,
        "gpu": "T4",
        "train_command": f"{command} lora.r=4",
    }


def test_generate_and_merge_are_wired(monkeypatch, record, capsys):
    # setitem on the module dict: setattr would read the lazy export first, importing the real module
    monkeypatch.setitem(vars(lorafuse), "load_model", record(result=("MODEL", "TOK")))
    monkeypatch.setitem(vars(lorafuse), "load_adapter", record(result="MODEL+A"))
    monkeypatch.setitem(vars(lorafuse), "generate", record(result="こんにちは"))
    monkeypatch.setitem(vars(lorafuse), "merge", record(result="out/merged"))
    assert (
        main(
            [
                "generate",
                "--model",
                "m",
                "--adapter",
                "a",
                "--prompt",
                "hi",
                "--quant",
                "none",
                "--max-new-tokens",
                "7",
                "--temperature",
                "0.5",
            ]
        )
        == 0
    )
    assert "こんにちは" in capsys.readouterr().out
    load, adapter, gen = record.calls[:3]
    assert load == (("m",), {"quant": "none", "compute_dtype": "auto"})
    assert adapter == (("MODEL", "a"), {})
    assert gen[0] == ("MODEL+A", "TOK", [{"role": "user", "content": "hi"}])  # the user message, to be rendered
    assert gen[1]["max_new_tokens"] == 7 and gen[1]["temperature"] == 0.5 and gen[1]["raw"] is False
    assert main(["merge", "--model", "m", "--adapter", "a", "--out", "o", "--from-16bit"]) == 0
    assert record.calls[3] == (("m", "a", "o"), {"dtype": "bfloat16", "from_16bit": True, "check": True})
    assert "out/merged" in capsys.readouterr().out


def test_chat_is_wired(monkeypatch, record):
    monkeypatch.setitem(vars(lorafuse), "load_model", record(result=("MODEL", "TOK")))
    fake_module(monkeypatch, "lorafuse.infer.chat", chat_loop=record())
    assert main(["chat", "--model", "m", "--system", "be brief"]) == 0
    args, kwargs = record.calls[1]
    assert args == ("MODEL", "TOK") and kwargs["system_prompt"] == "be brief"


def test_bench_passes_arguments_to_the_checkouts_harness(capsys):
    """`lorafuse bench` runs benchmarks/bench.py of this checkout with the arguments as given."""
    assert main(["bench", "--", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--shape" in out and "--stacks" in out


def failing(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


def test_lorafuse_error_exits_2_without_traceback(monkeypatch, capsys):
    monkeypatch.setattr("lorafuse.env.print_env", failing(ModelError("no GPU named foo", "pass --device cpu")))
    assert main(["env"]) == 2
    err = capsys.readouterr().err
    assert "error: no GPU named foo" in err and "fix: pass --device cpu" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--debug", "env"], ["env", "--debug"]])
def test_debug_shows_the_traceback(monkeypatch, capsys, argv):
    monkeypatch.setattr("lorafuse.env.print_env", failing(DataError("row 3 has no 'output'", "add it")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: row 3 has no 'output'" in err


def test_config_error_from_the_command_line(capsys):
    assert main(["train", "lora.rank=8"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lora.r'?" in err and "Traceback" not in err
    assert main(["train", "missing.yaml"]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["plan", "lora.r=8", "stray"]) == 2
    assert "'stray' is not a key=value override" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr("lorafuse.env.print_env", failing(KeyboardInterrupt()))
    assert main(["env"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_env_prints_versions_and_auto_dtype(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    import torch

    assert f"torch: {torch.__version__}" in out
    assert f"python: {sys.version.split()[0]}" in out
    for name in ("transformers:", "peft:", "bitsandbytes:", "triton:", "cuda:", "compute_dtype auto ->"):
        assert name in out
    if not torch.cuda.is_available():
        assert "compute_dtype auto -> float32" in out


def _python(code_or_args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, env=env, timeout=60, **kwargs
    )


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys; from lorafuse.cli import main; main(['--help']); main(['train', '--help']); "
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'pydantic', 'yaml', 'rich') "
        "if m in sys.modules))"
    )
    proc = _python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    # wall time of the real entry point; best of three so a busy shared machine doesn't decide it
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        proc = _python(["-m", "lorafuse", "--help"])
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == 0 and "lorafuse train" in proc.stdout
        if best < 1.0:
            break
    assert best < 1.0


def test_plans_suggestion_is_a_command_that_runs_as_printed(tmp_path, monkeypatch, record, capsys):
    example = str(ROOT / "examples" / "llama2-7b-dolly-ja-qlora.yaml")
    main(["plan", example, "--gpu-memory", "15GiB", "--gpu", "T4", "data.max_length=512"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("lorafuse train"))
    argv = shlex.split(line)
    assert argv[:4] == ["lorafuse", "train", example, "data.max_length=512"] and len(argv) > 4
    fake_module(monkeypatch, "lorafuse.job", run=record())
    assert main(argv[1:]) == 0
    (cfg,), _ = record.calls[0]
    for override in argv[4:]:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert str(getattr(getattr(cfg, section), name)).lower() == value.lower()

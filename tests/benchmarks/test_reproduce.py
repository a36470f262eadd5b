"""benchmarks/reproduce.sh: every part is one valid `lorafuse bench` command (or a named script), the parts its
header lists are the parts it runs, and its OUT argument routes the rows and the measured peaks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_args import parse_args, plan_runs  # noqa: E402  (the harness's parser, beside it in benchmarks/)

SCRIPT = ROOT / "benchmarks" / "reproduce.sh"


def script_parts() -> dict[str, str]:
    """part -> the command line of its case branch (the text between `part)` and `;;`)."""
    text = SCRIPT.read_text(encoding="utf-8")
    return dict(re.findall(r"^  ([\w-]+)\) (.+?) ;;$", text, flags=re.M))


def bench_parts() -> dict[str, list[str]]:
    """part -> the `lorafuse bench` arguments of the parts that run the harness."""
    return {part: shlex.split(line)[1:] for part, line in script_parts().items() if line.startswith("bench ")}


def test_every_bench_part_parses_and_runs_llama2_7b_qlora_or_lora():
    parts = bench_parts()
    assert {"qlora", "lean", "fp8", "lora", "1x4096", "8x2048", "dpo"} <= set(parts)
    for part, argv in parts.items():
        args = parse_args(argv)  # a bad flag or a peer with --random-init raises here
        runs = plan_runs(args)
        assert args.shape == "llama2-7b" and {m for _, m in runs} <= {"qlora", "lora"}, part
        assert args.fp8 == (part == "fp8" or part.endswith("-fp8")), part


def test_dpo_part_runs_the_three_stacks_on_7b_qlora_pairs():
    args = parse_args(bench_parts()["dpo"])
    assert (args.objective, args.pairs, args.seq, args.batch) == ("dpo", 4, 512, 8)
    assert sorted(plan_runs(args)) == [("hf", "qlora"), ("lorafuse", "qlora"), ("unsloth", "qlora")]
    assert args.timeout >= 150  # Unsloth takes ~80 s to load and compile a 7B before its first step
    assert {part for part, argv in bench_parts().items() if parse_args(argv).objective == "dpo"} == {
        "dpo",
        "dpo-8bit",
        "dpo-lorafuse",
        "dpo-eager",
        "dpo-separate",
    }


def test_the_8bit_dpo_part_is_the_dpo_part_with_every_optimizer_state_on_the_gpu():
    """dpo-8bit: the same three stacks and step, with non-paged 8-bit AdamW for all, so each peak counts its
    optimizer states (bitsandbytes' paged states live in managed memory that torch's counter leaves out)."""
    parts = bench_parts()
    assert parts["dpo-8bit"] == parts["dpo"] + ["--optimizer", "adamw_8bit"]
    assert parse_args(parts["dpo"]).optimizer == "paged_adamw_8bit"


def test_the_lorafuse_dpo_parts_differ_by_graphs_only():
    """dpo-lorafuse and dpo-eager: the same DPO step of lorafuse alone, with and without CUDA graphs."""
    parts = bench_parts()
    graphed, eager = parse_args(parts["dpo-lorafuse"]), parse_args(parts["dpo-eager"])
    assert plan_runs(graphed) == plan_runs(eager) == [("lorafuse", "qlora")]
    assert not graphed.no_graphs and eager.no_graphs

    assert parts["dpo-eager"] == parts["dpo-lorafuse"] + ["--no-graphs"]


def test_the_separate_prompts_part_differs_by_the_layout_only():
    """dpo-separate: dpo-lorafuse's step with a row per answer, the layout the peers run, for the shared prompt's
    ratio."""
    parts = bench_parts()
    assert parts["dpo-separate"] == parts["dpo-lorafuse"] + ["--shared-prompt", "off"]
    assert parse_args(parts["dpo-lorafuse"]).shared_prompt == "auto"


def test_the_header_lists_exactly_the_parts():
    header = [line[1:].split()[0] for line in SCRIPT.read_text().splitlines() if re.match(r"^#   [\w-]+ {2,}", line)]
    assert header == list(script_parts())


def test_out_routes_rows_and_peaks_and_an_unknown_part_is_refused(tmp_path):
    """A stand-in python3 on PATH records the command the qlora part runs."""
    env = _fake_python(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "qlora", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (argv,) = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
    assert argv[:5] == ["benchmarks/bench.py", "--out", str(out), "--memory-log", f"{out}/measured_memory.jsonl"]
    assert argv[5:] == bench_parts()["qlora"] and out.is_dir()
    bad = subprocess.run(["bash", str(SCRIPT), "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part 'nope'" in bad.stderr


def _fake_python(tmp_path: Path) -> dict:
    """An environment whose python3 appends its arguments, one line a call, to tmp_path/calls (a `python3 -c`
    probe, such as the script's check for pytest where a .whl/ folder lies in the checkout, answers yes, unrecorded)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "$@" >> {tmp_path}/calls\n')
    (fake / "python3").chmod(0o755)
    return {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(("part", "shapes"), [("memory", 8), ("headline", 2)])
def test_memory_parts_run_their_half_of_the_sweep(tmp_path, part, shapes):
    done = subprocess.run(
        ["bash", str(SCRIPT), part, str(tmp_path / "out")], env=_fake_python(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == shapes and all(f"--memory-log {tmp_path}/out/measured_memory.jsonl" in c for c in calls)
    assert any("llama-65b" in c for c in calls) == (part == "headline")

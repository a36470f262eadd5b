"""The README: its test command is the one .ci/run runs, its recipe is the example file, and it speaks to users."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LOG = "benchmarks/measured_memory.jsonl"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert "torch==2.13.0" in readme and "torch==2.13.0" in ci


def test_readme_seed_yaml_equals_the_example():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "llama2-7b-dolly-ja-qlora.yaml").read_text(encoding="utf-8")
    assert example.strip() in readme


def test_the_two_set_up_commands_stay_as_they_are():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 && pip install -e . && lorafuse train\n" in readme
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q\n' in readme


def test_placeholders_for_the_sections_still_to_come():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("dpo", "export", "ui", "tokens"):
        assert readme.count(f"<!-- section:{name} -->") == 1, name


def _script_parts() -> dict[str, list[str]]:
    """benchmarks/reproduce.sh's parts: name -> the words of its command, the script's defaults filled in."""
    text = (ROOT / "benchmarks" / "reproduce.sh").read_text(encoding="utf-8")
    parts = {}
    for name, line in re.findall(r"^  ([\w-]+)\) (.+?) ;;$", text, flags=re.M):
        words = shlex.split(line.replace('"$OUT"', "benchmarks/results").replace('"$LOG"', MEMORY_LOG))
        parts[name] = ["lorafuse", "bench", *words[1:]] if words[0] == "bench" else words
    return parts


def test_results_commands_are_the_reproduce_script():
    """The README's results table names reproduce.sh parts, and its command list is the script's, word for word."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = readme.split("## Results")[1].split("\n## ")[0]
    block = results.split("```\n")[1]
    listed = {m[0]: shlex.split(m[1]) for m in re.findall(r"^([\w-]+) {2,}(.+)$", block, flags=re.M)}
    assert listed == _script_parts()
    table_parts = re.findall(r"\| `([\w-]+)` \|$", results, flags=re.M)
    assert len(table_parts) >= 8 and set(table_parts) <= set(listed)


HISTORY = [
    r"\bsessions? \d",
    r"\b20\d\d-\d\d-\d\d\b",
    r"\banother (H100|H200|machine|card)\b",
    r"\bcalls? \d",
    r"\bround of work\b",
]


def test_the_user_facing_pages_tell_no_history():
    """README and docs/ say what lorafuse does and how to reproduce a number, not when or in which session."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    found = [
        f"{page.relative_to(ROOT)}: {m.group(0)!r}"
        for page in pages
        for pattern in HISTORY
        for m in re.finditer(pattern, page.read_text(encoding="utf-8"), flags=re.I)
    ]
    assert not found, found

"""docs/: the config reference is the one generated from the models, and the pages' links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorafuse.config_reference import END, START, config_reference_markdown, write_reference
from lorafuse.errors import LorafuseError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_config_reference_is_generated_from_the_models():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    block = text.split(START)[1].split(END)[0]
    assert block.strip() == config_reference_markdown().strip(), (
        "docs/config.md is stale: run `python -m lorafuse.config_reference`"
    )


def test_write_reference_fills_the_markers_and_keeps_the_rest(tmp_path):
    page = tmp_path / "config.md"
    page.write_text(f"# intro\n\n{START}\nSTALE TABLE\n{END}\n\ntail\n", encoding="utf-8")
    assert write_reference(page) is True
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# intro\n\n") and text.endswith(f"{END}\n\ntail\n") and "STALE TABLE" not in text
    assert config_reference_markdown().strip() in text
    assert write_reference(page) is False  # a second run changes nothing
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(LorafuseError, match="markers"):
        write_reference(bare)
    assert bare.read_text(encoding="utf-8") == "no markers\n"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(page):
    """Every relative Markdown link of the user-facing pages names a file or folder of the checkout."""
    text = page.read_text(encoding="utf-8")
    targets = [
        t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")
    ]
    missing = [t for t in targets if t and not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to {missing}"

"""The README's config reference, generated from the config models (`python -m lorafuse.config --reference`).

One Markdown table per section (key, type, default, description), written between the README's
`<!-- config-reference:start -->` / `<!-- config-reference:end -->` markers; tests/test_readme.py checks that
the README's copy is the generated one.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any, Literal

from lorafuse.config import _UNION, RunConfig, _fmt


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in _UNION:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def config_reference_markdown() -> str:
    """Markdown tables (key, type, default, description), one per section: the README's config reference."""
    lines: list[str] = []
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        lines += [
            f"### `{section}`",
            "",
            model.__doc__.strip(),
            "",
            "| key | type | default | description |",
            "|---|---|---|---|",
        ]
        for name, info in model.model_fields.items():
            if info.is_required():
                default = "required"
            else:
                value = info.get_default(call_default_factory=True)
                default = f"`{_fmt(value)}`"
            cells = [f"`{section}.{name}`", _type_name(info.annotation), default, info.description or ""]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_readme_reference(readme: str | Path = "README.md") -> bool:
    """Rewrite the README's config reference (between its markers) from the models; True if it changed."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    new = f"{head}{start}\n{config_reference_markdown().strip()}\n{end}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--reference"]:
        raise SystemExit("usage: python -m lorafuse.config --reference [README.md]")
    print("updated" if write_readme_reference(argv[1] if len(argv) > 1 else "README.md") else "up to date")

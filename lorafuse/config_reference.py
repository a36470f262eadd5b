"""The config reference (docs/config.md), generated from the config models: `python -m lorafuse.config_reference`.

One Markdown table per section (key, type, default, description), written between docs/config.md's
`<!-- config-reference:start -->` / `<!-- config-reference:end -->` markers; tests/test_docs.py checks that
the file's copy is the generated one.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any, Literal

from lorafuse.config import RunConfig, _fmt
from lorafuse.config_sections import _UNION
from lorafuse.errors import LorafuseError

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
DOCS_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "config.md"  # in a source checkout


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
    """Markdown tables (key, type, default, description), one per section: docs/config.md's reference."""
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


def write_reference(path: str | Path = DOCS_CONFIG) -> bool:
    """Rewrite the config reference between the file's markers from the models; True if it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise LorafuseError(f"{path} has no {START} ... {END} markers", "add both lines where the reference belongs")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{config_reference_markdown().strip()}\n{END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> None:
    """`python -m lorafuse.config_reference [PATH]` (PATH: docs/config.md of this checkout)."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--reference"]
    print("updated" if write_reference(argv[0] if argv else DOCS_CONFIG) else "up to date")


if __name__ == "__main__":
    main()

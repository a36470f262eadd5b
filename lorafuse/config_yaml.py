"""YAML reading for configs: line-numbered errors, duplicate keys refused, YAML 1.2 floats.

Three PyYAML behaviours bite config files and are fixed here:
- a syntax error surfaces as a multi-line parser dump; we raise one ConfigError naming the file, line,
  column and the offending line's text;
- a key written twice in one mapping silently keeps the last value; we refuse it and name both lines;
- YAML 1.1 reads `2e-4` (no dot) as the *string* "2e-4"; we resolve it as a float, as YAML 1.2 does, so
  values and error messages have the types the user meant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lorafuse.errors import ConfigError

_YAML12_FLOAT = re.compile(
    r"""^[-+]?(?:
      [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | [0-9][0-9_]*[eE][-+]?[0-9]+
    | \.[0-9_]+(?:[eE][-+]?[0-9]+)?
    | \.(?:inf|Inf|INF)
    )$|^\.(?:nan|NaN|NAN)$""",
    re.X,
)


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads exponent-only floats."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first set at line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def _syntax_error(path: Path, text: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return ConfigError(f"{path} is not valid YAML: {what}", "check the file's YAML syntax")
    line_no, col = mark.line + 1, mark.column + 1
    lines = text.splitlines()
    shown = f"\n    {line_no} | {lines[mark.line]}" if mark.line < len(lines) else ""
    fix = (
        "indent with spaces, not tabs"
        if "\t" in what or "'\\t'" in what
        else "check the indentation and the ':' after each key; quote values that contain ': ' or start with "
        "'*', '&', '!', '{', '[' or '%'"
    )
    if "duplicate key" in what:
        fix = "keep one of the two entries"
    return ConfigError(
        f"YAML error in {path} at line {line_no}, column {col}: {what}{shown}", f"{fix} (line {line_no})."
    )


def read_yaml_mapping(path: Path) -> dict:
    """Parse a config file into a dict; every problem (missing, unreadable, bad YAML, not a mapping) is a
    ConfigError that says what to do."""
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist",
            "check the path (examples/ has ready configs); `lorafuse train` with no config runs the built-in demo",
        )
    if path.is_dir():
        raise ConfigError(
            f"config path {path} is a folder, not a YAML file", "pass the YAML file itself, e.g. examples/tiny-cpu.yaml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc}", "check the file's permissions and that it is UTF-8 text"
        ) from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _syntax_error(path, text, exc) from None
    if raw is None:
        raise ConfigError(
            f"config file {path} is empty", "write at least `model: {path: ...}` and `data: {path: ...}`; see examples/"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} holds a {type(raw).__name__}, not a mapping of sections",
            "the top level must be sections: model, lora, data, train, output (see examples/)",
        )
    return raw


def parse_override_value(text: str) -> Any:
    """`32` -> 32, `[q_proj,v_proj]` -> list, `null` -> None, `2e-4` -> 0.0002; anything that is not
    valid YAML, or that YAML reads as a mapping without braces (`You are: helpful`), stays a string."""
    try:
        value = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text
    if value is None and text.strip() not in ("null", "~", "Null", "NULL"):
        return text  # `key=` (empty) means an empty string, not null
    return value

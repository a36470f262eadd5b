"""The run form's fields, read from the config models (lorafuse.config.RunConfig): a new key appears by itself.

Every leaf of the RunConfig tree (nested sections are walked) becomes a FieldSpec: its dotted key, a widget
kind, the field's description and a constraint line (type, range, choices, null allowed, required):

    check   bool                                           a checkbox
    choice  Literal[...], bool | Literal[...], and | None   a dropdown of words: "nf4", "true", "offload", "null"
    multi   list[Literal[...]]                             checkboxes, one per choice
    number  int, float                                     a number box
            int | None, float | None                       a text box: empty means null, else read as YAML
                                                           (a browser's number box sends 0 when empty)
    text    str (| None)                                   a text box; empty means null where null is allowed
    yaml    anything else (lists, dicts, str | list[str])  a text box read as `lorafuse train key=value` reads
                                                           its value (lorafuse.config_yaml.parse_override_value)

`widget_values(specs, cfg)` gives the widgets' values for a config and `raw_config(specs, values)` the plain
dict back, which lorafuse.config.validate_config checks exactly as it checks a YAML file: for every key,
validate_config(raw_config(specs, widget_values(specs, cfg))) == cfg.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lorafuse.config import RunConfig
from lorafuse.config_yaml import parse_override_value

_UNION = (typing.Union, types.UnionType)
_BOUNDS = {"Ge": "≥", "Gt": ">", "Le": "≤", "Lt": "<"}  # pydantic's annotated_types constraints, by class name


@dataclass(frozen=True)
class FieldSpec:
    key: str  # dotted: "train.max_steps"
    kind: str  # check | choice | multi | number | text | yaml
    description: str
    constraint: str  # "integer ≥ 1, or empty for null"
    nullable: bool = False
    integer: bool = False
    words: dict = field(default_factory=dict)  # choice: word shown -> value

    @property
    def widget(self) -> str:
        """checkbox | dropdown | checkboxes | number | textbox"""
        simple = {"check": "checkbox", "choice": "dropdown", "multi": "checkboxes"}
        return simple.get(self.kind) or ("number" if self.kind == "number" and not self.nullable else "textbox")

    @property
    def elem_id(self) -> str:
        return "cfg-" + self.key.replace(".", "-")

    @property
    def info(self) -> str:
        return f"{self.description} [{self.constraint}]"


def _members(annotation) -> list:
    if typing.get_origin(annotation) in _UNION:
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _word(value) -> str:
    return "null" if value is None else ("true" if value else "false") if isinstance(value, bool) else str(value)


def _bounds(info) -> str:
    names = [type(m).__name__ for m in info.metadata]
    parts = [f"{_BOUNDS[n]} {getattr(m, n.lower())}" for n, m in zip(names, info.metadata) if n in _BOUNDS]
    return " and ".join(parts)


def field_spec(key: str, info) -> FieldSpec:
    """The FieldSpec of one pydantic field (module docstring)."""
    members = _members(info.annotation)
    nullable = type(None) in members
    kinds = [m for m in members if m is not type(None)]
    literal = [v for m in kinds if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    required = info.default is PydanticUndefined and info.default_factory is None
    extra = ", or empty for null" if nullable else (" (required)" if required else "")
    desc = info.description or ""
    if all(m is bool or typing.get_origin(m) is Literal for m in kinds) and (literal or nullable):
        values = ([True, False] if bool in kinds else []) + literal + ([None] if nullable else [])
        words = {_word(v): v for v in values}
        return FieldSpec(key, "choice", desc, "one of " + ", ".join(words), nullable, words=words)
    if kinds == [bool]:
        return FieldSpec(key, "check", desc, "true/false")
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is list:
        (item,) = typing.get_args(kinds[0])
        if typing.get_origin(item) is Literal:
            words = {str(v): v for v in typing.get_args(item)}
            return FieldSpec(key, "multi", desc, "any of " + ", ".join(words), words=words)
    if set(kinds) <= {int, float}:
        integer = kinds == [int]
        bounds = _bounds(info)
        text = ("integer" if integer else "number") + (f" {bounds}" if bounds else "") + extra
        return FieldSpec(key, "number", desc, text, nullable, integer=integer)
    if kinds == [str]:
        return FieldSpec(key, "text", desc, "text" + extra, nullable)
    shape = " or ".join(_type_name(m) for m in kinds)
    return FieldSpec(key, "yaml", desc, f"YAML: {shape}{extra}", nullable)


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return "list such as [a, b]"
    if origin is dict:
        return "mapping such as {a: b}"
    return getattr(annotation, "__name__", str(annotation))


def form_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[FieldSpec]:
    """FieldSpecs of every leaf key of `model`, in declaration order, nested models walked."""
    specs = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            specs += form_fields(sub, f"{key}.")
        else:
            specs.append(field_spec(key, info))
    return specs


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """The widget value showing `value` (a config value in JSON form)."""
    if spec.kind == "check":
        return bool(value)
    if spec.kind == "choice":
        return _word(value)
    if spec.kind == "multi":
        return [str(v) for v in value]
    if spec.kind == "number" and not spec.nullable:
        return value
    if value is None:
        return ""
    if spec.kind == "number":
        return str(value)
    return value if spec.kind == "text" else _flow(value)


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """The config value a widget holds; anything invalid is passed on for validate_config to report."""
    if spec.kind == "check":
        return bool(value)
    if spec.kind == "choice":
        return spec.words.get(value, value)
    if spec.kind == "multi":
        return [spec.words.get(v, v) for v in value or []]
    empty = value is None or (isinstance(value, str) and not value.strip())
    if empty:
        return None if spec.nullable or spec.kind == "number" else ""
    if spec.kind == "number":
        if isinstance(value, str):
            value = parse_override_value(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return value  # not a number: validate_config says so
        number = float(value)  # a whole number stays an int so `r: 16` does not become 16.0
        return int(number) if number.is_integer() and (spec.integer or isinstance(value, int)) else number
    return value if spec.kind == "text" else parse_override_value(str(value))


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def widget_values(specs: list[FieldSpec], cfg: RunConfig) -> list:
    tree = cfg.model_dump(mode="json")
    return [to_widget(s, _get(tree, s.key)) for s in specs]


def raw_config(specs: list[FieldSpec], values: list) -> dict:
    """The nested plain dict of the widgets' values (what a YAML file would hold)."""
    raw: dict = {}
    for spec, value in zip(specs, values):
        node = raw
        *parents, leaf = spec.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = from_widget(spec, value)
    return raw

"""The spec's field reference as Markdown, generated from the schema itself: every section, every field with its
type, constraints, default and docstring. The docs site renders it (docs/hooks.py), so it never goes stale."""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from flowopd.spec.fields import INT_MAX
from flowopd.spec.schema import Spec

CONSTRAINTS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "pattern": "matches"}


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _constraints(metadata) -> str:
    found = []
    for item in metadata:
        for key, sign in CONSTRAINTS.items():
            value = getattr(item, key, None)
            if value is not None and not (key == "le" and value == INT_MAX):  # every int's bound (docs/specs.md)
                found.append(f"{sign} `{value}`" if key == "pattern" else f"{sign} {value}")
    return f" ({', '.join(found)})" if found else ""


def type_text(tp) -> str:
    """An annotation in words: `int (> 0)`, `one of "a", "b"`, `list of str`, `mapping str -> float`, links to
    sections."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *metadata = typing.get_args(tp)
        found = [m for m in metadata if hasattr(m, "discriminator") and m.discriminator]
        text = type_text(inner)
        return text + (f", chosen by `{found[0].discriminator}`" if found else "") + _constraints(
            [c for m in metadata for c in getattr(m, "metadata", [m])])
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        named = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping {type_text(key)} -> {type_text(value)}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{_anchor(tp)})"
    return getattr(tp, "__name__", str(tp))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    if isinstance(value, BaseModel):
        return "its defaults" if not value.model_fields_set else f"`{json.dumps(value.model_dump(mode='json'))}`"
    return f"`{json.dumps(value, default=list)}`"


def _models(tp) -> list[type[BaseModel]]:
    """The section models an annotation refers to, in order."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models(arg)]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def field_reference() -> str:
    """Markdown: one section per spec section model, reached from `Spec` breadth first."""
    lines, queue, seen = [], [Spec], set()
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        lines += [f"## {model.__name__} {{#{_anchor(model)}}}", "", _cell(model.__doc__ or ""), "",
                  "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            kind = type_text(field.annotation) + _constraints(field.metadata)
            if field.discriminator:
                kind += f", chosen by `{field.discriminator}`"
            lines.append(f"| `{name}` | {_cell(kind)} | {_cell(_default(field))} | "
                         f"{_cell(field.description or '')} |")
            queue += [m for m in _models(field.annotation) if m not in seen]
        lines.append("")
    return "\n".join(lines)

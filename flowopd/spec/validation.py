"""Validating a spec: read it and its `extends` chain, validate it into a frozen `Spec`, report every problem.

Every problem is one line, `file.yaml: dotted.field.path: message` (or `file.yaml:LINE:COL: message` for YAML
syntax), naming the file of the extends chain that set the offending value. Unknown fields suggest the closest
allowed one. Imports: stdlib, pydantic, yaml only (the CLI must answer fast).
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from flowopd.spec.errors import SpecError, dotted
from flowopd.spec.extends import Origins, resolve
from flowopd.spec.fields import DISCRIMINATORS
from flowopd.spec.schema import Spec


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop discriminated-union tags from a pydantic loc, walking the input it describes."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and part in [node.get(d) for d in DISCRIMINATORS]:
            continue
        out.append(part)
        has_key = isinstance(node, dict) and part in node
        has_index = isinstance(node, list | tuple) and isinstance(part, int) and part < len(node)
        node = node[part] if has_key or has_index else None
    return tuple(out)


def _unwrap(tp):
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _child_type(tp, part):
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part)
        return field.annotation if field else None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):  # discriminated union: `part` is the tag
        for member in map(_unwrap, typing.get_args(tp)):
            tags = [typing.get_args(_unwrap(member.model_fields[d].annotation))
                    for d in DISCRIMINATORS if isinstance(member, type) and d in member.model_fields]
            if tags and part in tags[0]:
                return member
        return None
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin in (tuple, list):
        return typing.get_args(tp)[0]
    return None


def _allowed_fields(loc: tuple) -> list[str]:
    tp = Spec
    for part in loc:
        tp = _child_type(tp, part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _message(err: dict) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        hint = f"; did you mean {close[0]!r}?" if close else hint
        return f"unknown field {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required field missing"
    if kind == "union_tag_not_found":
        return f"needs {err['ctx']['discriminator']} to choose a variant"
    if kind == "union_tag_invalid":
        ctx = err["ctx"]
        return f"unknown {ctx['discriminator']} {ctx['tag']!r}; expected one of {ctx['expected_tags']}"
    if kind in ("value_error", "assertion_error"):
        return err["msg"].split(", ", 1)[-1]  # drop pydantic's "Value error, " prefix
    message = err["msg"]
    value = err.get("input")
    if isinstance(value, str | int | float | bool):
        shown = repr(value)
        message += f" (got {shown if len(shown) <= 80 else shown[:76] + '...'})"
    return message


def _problems_from(err: ValidationError, data: dict, origins: Origins) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        if e["type"] == "spec_checks":
            found = [(tuple(loc), msg) for loc, msg in e["ctx"]["problems"]]
        else:
            found = [(_clean_loc(e["loc"], data), _message(e))]
        for loc, msg in found:
            where = f"{dotted(loc)}: " if loc else ""
            lines.append(f"{origins.file_of(loc)}: {where}{msg}")
    return list(dict.fromkeys(lines))


def validate_spec(data: dict, source: str = "<spec>") -> Spec:
    """Validate a raw mapping into a Spec, raising SpecError with one line per problem."""
    return _validate(data, Origins(source))


def _validate(data: dict, origins: Origins) -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems_from(err, data, origins)) from None


def load_spec(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Spec:
    """Read, resolve `extends` (inside the repository `root`, default the working directory), validate. Raises
    SpecError (one line per problem) on any bad input."""
    data, origins = resolve(path, root)
    return _validate(data, origins)


def load_spec_or_exit(path: str | os.PathLike) -> Spec:
    """load_spec for command lines: the problems, one per line, as the exit message (no traceback)."""
    try:
        return load_spec(path)
    except SpecError as error:
        raise SystemExit(str(error)) from None

"""YAML files and `extends`: strict safe loading, the chain of files a spec is built from, and their merge.

A file may start from another one with `extends: ../flow_opd.yaml` (resolved against the extending file's folder):
mappings merge recursively, lists and scalars replace, and a mapping whose `kind` / `method` changes replaces the
inherited one (switching a cold start from merge to sft does not keep merge's fields). `Origins` remembers which file
of the chain set each value, so a problem names the file to edit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from flowopd.spec.errors import SpecError, display_path
from flowopd.spec.fields import DISCRIMINATORS


class Origins:
    """Which file of the extends chain set each path of the merged data (the last writer wins)."""

    def __init__(self, default: str):
        self.default, self.by_loc, self.writes = default, {}, 0

    def record(self, data: Any, file: str, prefix: tuple = ()):
        self.writes += 1
        self.by_loc[prefix] = (self.writes, file)
        if isinstance(data, dict):
            for key, value in data.items():
                self.record(value, file, (*prefix, key))

    def forget(self, prefix: tuple):
        for loc in [loc for loc in self.by_loc if loc[: len(prefix)] == prefix]:
            del self.by_loc[loc]

    def file_of(self, loc: tuple) -> str:
        """The last file to write loc or anything inside it (a section's check blames its latest edit)."""
        inside = [written for at, written in self.by_loc.items() if at[: len(loc)] == loc]
        if inside:
            return max(inside)[1]
        for end in range(len(loc) - 1, -1, -1):
            if loc[:end] in self.by_loc:
                return self.by_loc[loc[:end]][1]
        return self.default


# ---------------------------------------------------------------- YAML: safe, duplicate keys refused
class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-3 as a float (YAML 1.1 wants 1.0e-3)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str) -> Any:
    shown = display_path(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{shown}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([f"{shown}: cannot read: {getattr(err, 'strerror', None) or err}"]) from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        if mark is None:
            raise SpecError([f"{shown}: {err}"]) from None
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.problem and err.context_mark and err.context_mark.line != mark.line:
            problem += f" ({err.context} at line {err.context_mark.line + 1})"
        raise SpecError([f"{shown}:{mark.line + 1}:{mark.column + 1}: {problem}"]) from None
    except yaml.YAMLError as err:
        raise SpecError([f"{shown}: {err}"]) from None


# ---------------------------------------------------------------- extends
def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge recursively; lists and scalars replace, and so does a mapping whose kind changes."""
    out = dict(base)
    for key, value in override.items():
        if _merges(out.get(key), value):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _merges(base: Any, override: Any) -> bool:
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return False
    return all(d not in override or d not in base or override[d] == base[d]
               or isinstance(override[d], dict)  # a teacher's `method` section, not a discriminator's value
               for d in DISCRIMINATORS)


def _merge_tracked(base: dict, override: dict, file: str, origins: Origins, prefix: tuple = ()) -> dict:
    out = dict(base)
    for key, value in override.items():
        loc = (*prefix, key)
        if _merges(out.get(key), value):
            out[key] = _merge_tracked(out[key], value, file, origins, loc)
        else:
            origins.forget(loc)
            origins.record(value, file, loc)
            out[key] = value
    return out


def extends_chain(path: str | os.PathLike) -> list[tuple[Path, dict]]:
    """The files a spec is built from, root first: (path, that file's own mapping without `extends`)."""
    path, chain, seen = os.path.normpath(path), [], []
    while True:
        shown, real = display_path(path), os.path.realpath(path)
        if real in seen:
            cycle = " -> ".join(display_path(p) for p in (*seen[seen.index(real):], real))
            raise SpecError([f"{display_path(chain[0][0])}: extends cycle: {cycle}"])
        seen.append(real)
        data = read_yaml(path)
        if not isinstance(data, dict):
            got = "an empty file" if data is None else f"a {type(data).__name__}"
            raise SpecError([f"{shown}: a spec must be a YAML mapping, got {got}"])
        data = dict(data)
        parent = data.pop("extends", None)
        chain.append((Path(path), data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise SpecError([f"{shown}: extends: must be a path to another spec file, got {parent!r}"])
        path = os.path.normpath(os.path.join(os.path.dirname(path), parent))
        if not os.path.exists(path):
            raise SpecError([f"{shown}: extends: file not found: {display_path(path)}"])


def resolve(path: str | os.PathLike) -> tuple[dict, Origins]:
    """Merge the chain root first, remembering which file set each value."""
    chain = extends_chain(path)
    leaf = display_path(chain[-1][0])
    merged, origins = {}, Origins(leaf)
    for file, data in chain:
        merged = _merge_tracked(merged, data, display_path(file), origins)
    origins.by_loc[()] = leaf
    return merged, origins


def resolve_raw(path: str | os.PathLike) -> dict:
    """The merged mapping of a spec file and its `extends` chain, before validation."""
    return resolve(path)[0]

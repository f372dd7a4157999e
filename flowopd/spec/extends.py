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
from flowopd.spec.paths import (
    DATA_ROOTS_ENV,
    SPEC_FILE_MAX_BYTES,
    PathRefused,
    allowed_roots,
    inside,
    read_confined,
)

# The shipped specs alias a teacher's method five times (about 100 nodes) and nest 6 levels; these bounds are far
# above that and far below a mapping alias bomb (a few hundred bytes that expand to a billion nodes).
ALIAS_NODES_MAX = 10_000  # nodes that aliases may add to a document, counted as if each alias were copied out
DEPTH_MAX = 50  # nested mappings and lists


class Origins:
    """Which file of the extends chain set each path of the merged data (the last writer wins).

    A tree of the merged data's paths, each node (write number, file, children): recording a value and looking up
    a path cost the value's size and the path's depth, so 20,000 problems are named as fast as one."""

    def __init__(self, default: str):
        self.default, self.writes, self.root = default, 0, [0, default, {}]

    def record(self, data: Any, file: str, prefix: tuple = ()):
        """`file` set the value at prefix, replacing what was recorded there and inside it."""
        node = self.root
        for key in prefix:
            node = node[2].setdefault(key, [0, self.default, {}])
        self.writes += 1
        node[:] = [self.writes, file, {}]
        if isinstance(data, dict):
            for key, value in data.items():
                self.record(value, file, (*prefix, key))

    def blame_leaf(self, file: str):
        """Problems of the spec as a whole (a required section missing) name the file that was asked for."""
        self.writes += 1
        self.root[:2] = [self.writes, file]

    def file_of(self, loc: tuple) -> str:
        """The last file to write loc or anything inside it (a section's check blames its latest edit)."""
        node, found = self.root, self.root
        for key in loc:
            node = node[2].get(key)
            if node is None:
                return found[1]  # not written: the closest written section above it
            found = node
        return max(_stamps(node))[1]


def _stamps(node):
    stack = [node]
    while stack:
        node = stack.pop()
        yield node[0], node[1]
        stack.extend(node[2].values())


# ---------------------------------------------------------------- YAML: safe, duplicate keys refused
class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-3 as a float (YAML 1.1 wants 1.0e-3); aliases and
    nesting are bounded on the node graph, before any object is built."""

    def compose_node(self, parent, index):
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > DEPTH_MAX:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {DEPTH_MAX} levels",
                                              self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node) - _distinct_size(node) > ALIAS_NODES_MAX:
            raise yaml.composer.ComposerError(None, None, f"aliases expand to more than {ALIAS_NODES_MAX} extra "
                                              "nodes", node.start_mark)
        return node

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


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(node) -> int:
    """Nodes of the document with every alias copied out, counted on the graph (each node once, memoised); a
    node that contains itself (`&a [*a]`) counts as infinite."""
    sizes, entered, stack = {}, set(), [(node, False)]
    while stack:
        current, done = stack.pop()
        if id(current) in sizes:
            continue
        if done:
            sizes[id(current)] = 1 + sum(sizes[id(c)] for c in _children(current))
            continue
        if id(current) in entered:  # met again below itself
            return float("inf")
        entered.add(id(current))
        stack.append((current, True))
        stack.extend((c, False) for c in _children(current) if id(c) not in sizes)
    return sizes[id(node)]


def _distinct_size(node) -> int:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if id(current) not in seen:
            seen.add(id(current))
            stack.extend(_children(current))
    return len(seen)


def read_yaml(path: str, roots=None) -> Any:
    """A spec file's data: a regular file under SPEC_FILE_MAX_BYTES (inside `roots` when given), read with
    StrictLoader. Problems name the file, line and rule; never a line of the file."""
    shown = display_path(path)
    try:
        text = read_confined(path, SPEC_FILE_MAX_BYTES, roots).decode("utf-8")
    except FileNotFoundError:
        raise SpecError([f"{shown}: file not found"]) from None
    except PathRefused as err:
        raise SpecError([f"{shown}: refused: {err}"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{shown}: not UTF-8 text"]) from None
    except OSError as err:
        raise SpecError([f"{shown}: cannot read: {err.strerror or type(err).__name__}"]) from None
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
    except yaml.YAMLError:
        raise SpecError([f"{shown}: invalid YAML"]) from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits
        raise SpecError([f"{shown}: invalid YAML: {type(err).__name__}"]) from None


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
            origins.record(value, file, loc)
            out[key] = value
    return out


def extends_chain(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[Path, dict]]:
    """The files a spec is built from, root first: (path, that file's own mapping without `extends`). Each file
    it extends is a .yaml / .yml file inside the repository `root` (default: the working directory) or a folder of
    FLOWOPD_DATA_ROOTS (flowopd.spec.paths)."""
    path, chain, seen, roots = os.path.normpath(path), [], [], None
    while True:
        shown, real = display_path(path), os.path.realpath(path)
        if real in seen:
            cycle = " -> ".join(display_path(p) for p in (*seen[seen.index(real):], real))
            raise SpecError([f"{display_path(chain[0][0])}: extends cycle: {cycle}"])
        seen.append(real)
        data = read_yaml(path, roots)
        if not isinstance(data, dict):
            got = "an empty file" if data is None else f"a {type(data).__name__}"
            raise SpecError([f"{shown}: a spec must be a YAML mapping, got {got}"])
        data = dict(data)
        parent = data.pop("extends", None)
        chain.append((Path(path), data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise SpecError([f"{shown}: extends: must be a path to another spec file, got a {type(parent).__name__}"])
        path = os.path.normpath(os.path.join(os.path.dirname(path), parent))
        roots = roots or allowed_roots(root)
        if not path.endswith((".yaml", ".yml")):
            raise SpecError([f"{shown}: extends: must name a .yaml or .yml spec file"])
        if not inside(path, roots):
            outside = f"{display_path(path)} is outside the repository (folders elsewhere need {DATA_ROOTS_ENV})"
            raise SpecError([f"{shown}: extends: {outside}"])
        if not os.path.exists(path):
            raise SpecError([f"{shown}: extends: file not found: {display_path(path)}"])


def resolve(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[dict, Origins]:
    """Merge the chain root first, remembering which file set each value."""
    chain = extends_chain(path, root)
    leaf = display_path(chain[-1][0])
    merged, origins = {}, Origins(leaf)
    for file, data in chain:
        merged = _merge_tracked(merged, data, display_path(file), origins)
    origins.blame_leaf(leaf)
    return merged, origins


def resolve_raw(path: str | os.PathLike) -> dict:
    """The merged mapping of a spec file and its `extends` chain, before validation."""
    return resolve(path)[0]

"""Each stage's code dependencies, computed from what its entry point imports, so none is kept by hand.

A stage depends on its entry point (`stages/<phase>.py`) and on every `flowopd` module it can import: followed
transitively through the source (imports inside functions included, the packages' `__init__.py` with them), read
with `ast`, never executed. So an edit reruns exactly the stages whose code can run it: an SFT edit reruns the SFT
cold starts and what descends from them, not every OPD stage. tests/pipeline/test_code_deps.py checks the result
against the modules a stage process really loads.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "flowopd"


def _module_path(root: Path, name: str) -> Path | None:
    """The file of a module name under `root` (a package's `__init__.py`), or None when it is no flowopd module."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path) -> set[str]:
    """Every module name an `import` anywhere in the file may load (for `from a import b`: a.b and a)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _with_parents(name: str) -> list[str]:
    """A module and the packages Python imports before it: flowopd.a.b -> flowopd, flowopd.a, flowopd.a.b."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _sources(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def _compact(root: Path, files: set[Path]) -> list[str]:
    """A package whose every module is a dependency is listed as its folder (DVC hashes it whole), the rest as files."""
    whole = {folder for folder in {parent for f in files for parent in f.parents}
             if (folder / "__init__.py").is_file() and root in folder.parents and _sources(folder) <= files}
    top = {folder for folder in whole if not any(parent in whole for parent in folder.parents)}
    single = {f for f in files if not any(folder in f.parents for folder in top)}
    return sorted(p.relative_to(root).as_posix() for p in top | single)


@functools.cache
def _closure(root: Path, entry: Path) -> tuple[str, ...]:
    files, todo, seen = {entry}, [entry], set()
    while todo:
        path = todo.pop()
        for name in _imported_names(path):
            for module in _with_parents(name):
                if module in seen:
                    continue
                seen.add(module)
                found = _module_path(root, module)
                if found is not None and found not in files:
                    files.add(found)
                    todo.append(found)
    return tuple(_compact(root, files))


def code_deps(entry: str, root: Path = Path(".")) -> list[str]:
    """What a stage's code is: its entry point (e.g. "stages/opd.py") and every flowopd module it can import, as
    paths relative to `root` (the repository), sorted; a package all of whose modules are imported is its folder."""
    root = Path(root).resolve()
    return list(_closure(root, root / entry))


def stage_code_deps(phase: str, root: Path = Path(".")) -> list[str]:
    """code_deps of the stage entry point `stages/<phase>.py`."""
    return code_deps(f"stages/{phase}.py", root)

"""The package's layout: subpackages in layers, imports running one way (imports inside functions count), no
circles, no two modules of one name, files one can read in a sitting. `python tests/test_layout.py` prints the
layers and each subpackage's imports."""

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowopd"
# Bottom up: a module may import its own subpackage and the ones listed before it, never one listed after.
LAYERS = ("spec", "runtime", "world", "models", "rewards", "flow", "train", "methods", "evaluation", "phases",
          "pipeline", "results", "cli")
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def subpackage(module: str) -> str | None:
    """flowopd.methods.grpo -> methods; the top-level flowopd.cli -> cli; flowopd, flowopd.__main__ -> None."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    return parts[1]


def imports() -> dict[str, set[str]]:
    """module -> the flowopd modules it imports anywhere in its source (`from a import b`: a.b if a module, else a)."""
    known = modules()
    graph = defaultdict(set)
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.level, f"{path}: relative import (the project writes absolute imports)"
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                         for a in node.names]
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != module and name.startswith("flowopd"):
                    graph[module].add(name)
    return graph


def test_every_module_belongs_to_a_layer_and_every_folder_is_a_package():
    for module in modules():
        assert module in ("flowopd", "flowopd.__main__") or subpackage(module) in LAYERS, module
    for folder in PACKAGE.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"


def test_imports_run_from_the_runtime_up_to_the_phases_and_results():
    wrong = []
    for module, targets in imports().items():
        own = subpackage(module)
        if own is None:
            continue
        for target in targets:
            other = subpackage(target)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{module} imports {target} ({other} is above {own})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules():
    graph = imports()
    state, circles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(modules()):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_module_names_are_unique_and_files_short():
    names = defaultdict(list)
    for module, path in modules().items():
        if path.name != "__init__.py":
            names[path.stem].append(module)
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_LINES}: split by role)"
    repeated = {stem: found for stem, found in names.items() if len(found) > 1}
    assert not repeated, f"modules sharing a name: {repeated}"


def layer_report() -> str:
    """Each subpackage, bottom up, with the subpackages it imports."""
    uses = defaultdict(set)
    for module, targets in imports().items():
        for target in targets:
            a, b = subpackage(module), subpackage(target)
            if a and b and a != b:
                uses[a].add(b)
    return "\n".join(f"{i:2d} {layer:<11} imports {', '.join(sorted(uses[layer], key=LAYERS.index)) or '-'}"
                     for i, layer in enumerate(LAYERS))


if __name__ == "__main__":
    print(layer_report())
    for test in (test_every_module_belongs_to_a_layer_and_every_folder_is_a_package,
                 test_imports_run_from_the_runtime_up_to_the_phases_and_results, test_no_import_circle_between_modules,
                 test_module_names_are_unique_and_files_short):
        test()
    print("no circle, no upward import", file=sys.stderr)

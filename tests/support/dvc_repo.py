"""Scratch DVC repositories for the end-to-end tests: the library, the stages and some specs, git and dvc set up."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MICRO = (ROOT / "tests/data/micro.yaml").read_text().replace("../../specs/flow_opd.yaml", "parent/flow_opd.yaml")


def environment() -> dict:
    """This environment with this interpreter's folder first on PATH (stage commands call `python`)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A command in the tree; with `check`, a failure shows its output."""
    done = subprocess.run(args, cwd=tree, env=environment(), capture_output=True, text=True, check=False)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def scratch_repo(tree: Path, specs: dict[str, str]) -> Path:
    """flowopd/ and stages/ copied, `specs/parent/flow_opd.yaml` (outside the pipeline globs, for `extends`), the
    given specs (path under specs/ -> YAML text), a git repository with one commit and DVC without analytics."""
    for folder in ("flowopd", "stages"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "specs/parent").mkdir(parents=True)
    shutil.copy(ROOT / "specs/flow_opd.yaml", tree / "specs/parent")
    for name, text in specs.items():
        (tree / "specs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / "specs" / name).write_text(text)
    (tree / ".gitignore").write_text("/artifacts/\nledger.duckdb*\n__pycache__/\n")
    run(tree, "git", "init", "-q")
    run(tree, "dvc", "init", "-q")
    run(tree, "dvc", "config", "core.analytics", "false")
    run(tree, "git", "add", "-A")
    run(tree, "git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "scratch")
    return tree


def ran(output: str) -> set[str]:
    """Names of the stages a `dvc repro` / `dvc exp run` output says it ran (without a `sub/dvc.yaml:` prefix)."""
    return {name.rpartition(":")[2] for name in re.findall(r"Running stage '([^']+)'", output)}


def locked_out(tree: Path, stage: str, out: str) -> dict:
    """An output's entry (md5, size, ...) in the stage's dvc.lock record."""
    lock = yaml.safe_load((tree / "dvc.lock").read_text())
    return next(o for o in lock["stages"][stage]["outs"] if o["path"] == out)

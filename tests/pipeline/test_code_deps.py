"""Each stage's code dependencies are computed from its imports: precise (an SFT edit reruns no OPD stage) and
complete (every flowopd module a stage process really loads is one of them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.phases.data import run_data
from flowopd.pipeline.code_deps import code_deps, stage_code_deps
from flowopd.runtime.artifacts import atomic_folder, write_provenance
from flowopd.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "data" / "micro.yaml"
PHASES = ("data", "base", "teacher", "baseline", "cold_start", "opd", "eval", "ledger", "report")


def covered(path: str, deps: list[str]) -> bool:
    """A file is covered when it or a folder above it is listed."""
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def test_every_dependency_exists_and_the_entry_point_is_one():
    for phase in PHASES:
        deps = stage_code_deps(phase, ROOT)
        assert f"stages/{phase}.py" in deps and deps == sorted(deps)
        assert all((ROOT / dep).exists() for dep in deps), phase
        assert covered("flowopd/__init__.py", deps)


def test_an_edit_reruns_only_the_stages_whose_code_can_run_it():
    deps = {phase: stage_code_deps(phase, ROOT) for phase in PHASES}
    uses = {path: {phase for phase in PHASES if covered(path, deps[phase])}
            for path in ("flowopd/methods/sft.py", "flowopd/methods/merge.py", "flowopd/methods/opd_trainer.py",
                         "flowopd/methods/nft.py", "flowopd/evaluation/exploits.py", "flowopd/results/tables.py",
                         "flowopd/spec/spec_cli.py", "flowopd/models/tiny.py")}
    assert uses["flowopd/methods/sft.py"] == uses["flowopd/methods/merge.py"] == {"cold_start"}
    assert uses["flowopd/methods/opd_trainer.py"] == {"opd"}
    assert uses["flowopd/methods/nft.py"] == {"teacher", "baseline"}
    assert uses["flowopd/evaluation/exploits.py"] == {"eval"}
    assert uses["flowopd/results/tables.py"] == {"report"}
    assert uses["flowopd/spec/spec_cli.py"] == set()  # the `flowopd spec` command is no stage's code
    assert uses["flowopd/models/tiny.py"] == {"base", "teacher", "baseline", "cold_start", "opd", "eval"}


def test_a_folder_is_listed_whole_only_when_every_module_in_it_is_imported(tmp_path):
    (tmp_path / "flowopd/a").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "flowopd/__init__.py").write_text("")
    (tmp_path / "flowopd/a/__init__.py").write_text("")
    (tmp_path / "flowopd/a/x.py").write_text("def f():\n    import flowopd.a.y\n")  # inside a function counts
    (tmp_path / "flowopd/a/y.py").write_text("")
    (tmp_path / "flowopd/b.py").write_text("")
    (tmp_path / "stages/s.py").write_text("from flowopd.a import x\n")
    assert code_deps("stages/s.py", tmp_path) == ["flowopd/__init__.py", "flowopd/a", "stages/s.py"]
    (tmp_path / "flowopd/a/z.py").write_text("")  # a module nothing imports: the folder's files, not the folder
    (tmp_path / "stages/t.py").write_text("from flowopd.a import x\n")
    assert code_deps("stages/t.py", tmp_path) == ["flowopd/__init__.py", "flowopd/a/__init__.py", "flowopd/a/x.py",
                                                  "flowopd/a/y.py", "stages/t.py"]


def loaded_modules(stage: str, *args) -> set[str]:
    """The flowopd files a stage process imported while it ran (`python -X importtime` lists every import)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-X", "importtime", f"stages/{stage}.py", *map(str, args), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    names = set(re.findall(r"\|\s+(flowopd(?:\.\w+)*)\s*$", done.stderr, flags=re.MULTILINE))
    assert names, "no import listed"
    files = set()
    for name in names:
        base = ROOT.joinpath(*name.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        files.add(path.relative_to(ROOT).as_posix())
    return files


def test_the_modules_a_stage_loads_are_its_dependencies(tmp_path):
    spec = load_spec(MICRO)
    run_data(spec, tmp_path / "data")
    torch.manual_seed(0)
    with atomic_folder(tmp_path / "base") as staging:  # as the base phase writes it: meta.json records the hashes
        TinyBundle(tiny_model_config(spec)).eval().save(staging)
        write_provenance(staging, "base", {})
    none = tmp_path / "none.yaml"
    none.write_text(f"extends: {MICRO}\ncold_start: {{method: none}}\n")
    runs = {"data": ["--spec", MICRO, "--out", tmp_path / "data_2"],
            "cold_start": ["--spec", none, "--base", tmp_path / "base", "--out", tmp_path / "student"]}
    for stage, args in runs.items():
        deps = stage_code_deps(stage, ROOT)
        missing = sorted(path for path in loaded_modules(stage, *args) if not covered(path, deps))
        assert not missing, f"{stage} loaded modules outside its code dependencies: {missing}"


@pytest.mark.parametrize("phase", PHASES)
def test_dvc_yaml_lists_the_computed_dependencies(phase):
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = stage_code_deps(phase, ROOT)
    for name, stage in stages.items():
        if name.split("-")[0] == phase:
            assert stage["deps"][: len(deps)] == deps, name

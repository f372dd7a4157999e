"""Artifact folders: atomic (a crash leaves nothing half-written), a function of their inputs, provenance beside."""

import json
import subprocess
import time

import pytest

from flowopd.runtime.artifacts import atomic_folder, sha256_file, write_provenance
from flowopd.runtime.records import git_state, process_started, read_run_record, run_record_path
from flowopd.spec.hashing import canonical_hash


def test_atomic_folder_replaces_target_only_on_success(tmp_path):
    target = tmp_path / "artifact"
    with atomic_folder(target) as folder:
        (folder / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_folder(target) as folder:
        (folder / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no staging folder left behind


def write(target, seconds: float, processes: int):
    curve = [{"step": s, "loss": 1.0 / (s + 1), "rollout_s": seconds / 10, "seconds": seconds * s} for s in range(3)]
    with atomic_folder(target) as folder:
        (folder / "weights").write_text("w")
        write_provenance(folder, "base", {"base": {"steps": 3}, "seed": 0}, curve=curve, spec_name="micro",
                         spec_hash="h" * 64, processes=processes, seconds=seconds, parameters=12,
                         started="2025-01-01T00:00:00+00:00", finished="2025-01-01T00:10:00+00:00")
    return {p.name: p.read_bytes() for p in sorted(target.iterdir())}


def test_the_folder_holds_what_the_inputs_determine_and_the_run_record_the_rest(tmp_path):
    target = tmp_path / "base" / "abc"
    age_before = time.time() - process_started()
    files = write(target, seconds=1.5, processes=1)
    age_after = time.time() - process_started()
    assert set(files) == {"weights", "spec.json", "meta.json"}
    meta = json.loads(files["meta.json"])
    assert meta == {"phase": "base", "sections_hash": canonical_hash({"seed": 0, "base": {"steps": 3}}),
                    "parameters": 12, "files": {name: sha256_file(target / name) for name in ("spec.json", "weights")}}
    assert json.loads(files["spec.json"]) == {"base": {"steps": 3}, "seed": 0}
    run = read_run_record(target)
    assert run_record_path(target) == tmp_path / "base" / "abc.run.json"
    assert run["seconds"] == 1.5 and run["spec_name"] == "micro" and run["processes"] == 1
    assert {"git_rev", "git_dirty", "python", "packages", "device", "host", "argv"} <= run.keys()
    assert run["sections_hash"] == meta["sections_hash"]
    assert run["curve_timing"] == [{"step": s, "rollout_s": 0.15, "seconds": 1.5 * s} for s in range(3)]
    # the process's age when the phase's clock (1.5 s before the write) started; as a test, no import pause
    assert age_before - 1.5 - 0.01 <= run["startup_seconds"] <= age_after - 1.5 + 0.01
    assert "import_seconds" not in run


def test_a_rerun_that_differs_only_in_its_run_writes_the_same_bytes(tmp_path):
    target = tmp_path / "abc"
    first = write(target, seconds=1.5, processes=1)
    first_run = read_run_record(target)
    assert write(target, seconds=9.0, processes=2) == first
    second_run = read_run_record(target)
    assert (second_run["seconds"], second_run["processes"]) == (9.0, 2) != (first_run["seconds"], 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc", "abc.run.json"]


def test_dirty_means_code_or_specs_differ_from_the_commit(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for path in ("specs/main.yaml", "flowopd/phases/keys.py", "dvc.lock", "reports/main_table.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("committed\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    assert git_state(tmp_path) == {"git_rev": git_rev(tmp_path), "git_dirty": False}
    for rewritten_by_dvc in ("dvc.lock", "reports/main_table.md", "artifacts/base.run.json", "reports/new.csv"):
        (tmp_path / rewritten_by_dvc).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rewritten_by_dvc).write_text("rewritten during `dvc repro`\n")
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "specs/ablation.yaml").write_text("a new spec, not committed\n")
    assert git_state(tmp_path)["git_dirty"] is True
    (tmp_path / "specs/ablation.yaml").unlink()
    (tmp_path / "flowopd/phases/keys.py").write_text("edited\n")
    assert git_state(tmp_path)["git_dirty"] is True


def git_rev(folder) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                          check=True).stdout.strip()

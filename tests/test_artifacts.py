"""Artifact folders: atomic (a crash leaves nothing half-written) and carrying their provenance."""

import json

import pytest

from flowopd.artifacts import atomic_folder, canonical_hash, write_provenance


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


def test_provenance_records_hash_git_and_environment(tmp_path):
    sub_spec = {"base": {"steps": 3}, "seed": 0}
    meta = write_provenance(tmp_path, "base", sub_spec, seconds=1.5)
    assert json.loads((tmp_path / "spec.json").read_text()) == sub_spec
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta
    assert meta["sections_hash"] == canonical_hash({"seed": 0, "base": {"steps": 3}})
    assert meta["phase"] == "base" and meta["seconds"] == 1.5
    assert {"git_rev", "git_dirty", "python", "packages", "device"} <= meta.keys()

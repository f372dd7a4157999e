"""Failures lose nothing: a failed or killed rerun keeps the previous artifact's run record and the previous report;
a killed writer's staging folder is removed by the next run, a running writer's never; the ledger and the report
never run at once (the second waits, or stops with a clear message naming the lock and its holder)."""

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dvc_repo import environment

from flowopd.pipeline.dvc import TINY, _Builder, artifact_outs
from flowopd.results import report_cli
from flowopd.results.ledger_cli import ledger_lock, ledger_stage
from flowopd.runtime import artifacts
from flowopd.runtime.artifacts import atomic_folder, remove_stale_staging, staging_folder, write_provenance

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_artifact(target: Path, weights: str, fail: bool = False) -> None:
    with atomic_folder(target) as folder:
        (folder / "model.safetensors").write_text(weights)
        if fail:
            raise RuntimeError("cold start failed")
        write_provenance(folder, "cold_start", {"cold_start": {"method": "merge"}}, seconds=1.0)


# ---------------------------------------------------------------- run records
def test_a_failed_rerun_keeps_the_folder_and_its_run_record(tmp_path):
    target = tmp_path / "cold_start" / "abc"
    write_artifact(target, "v1")
    before = snapshot(tmp_path)
    assert "cold_start/abc.run.json" in before
    with pytest.raises(RuntimeError, match="cold start failed"):
        write_artifact(target, "half", fail=True)
    assert snapshot(tmp_path) == before


def dvc(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tree, env=environment(), capture_output=True,
                          text=True, check=False)


def test_dvc_keeps_run_records_and_report_outputs_through_a_failed_rerun(tmp_path):
    """With the outputs dvc.yaml declares (artifact_outs, the report stage's), DVC deletes neither the run record
    nor the report before a rerun that then fails."""
    builder = _Builder(ROOT, TINY)
    builder.shards = {"artifacts/eval/x": "artifacts/base/y"}
    builder.ledger_and_report()
    report_outs = builder.stages["report"]["outs"]
    (tmp_path / "stage.py").write_text(
        "import os, pathlib, sys\n"
        "from flowopd.runtime.artifacts import atomic_folder, write_provenance, write_text\n"
        "if os.path.exists('FAIL'):\n    sys.exit('failed')\n"
        "with atomic_folder(pathlib.Path('artifacts/cold')) as folder:\n"
        "    write_text(folder / 'w', 'weights')\n    write_provenance(folder, 'cold_start', {})\n"
        f"for out in {[next(iter(o)) for o in report_outs]!r}:\n"
        "    write_text(pathlib.Path(out + ('/x.png' if '.' not in out[-5:] else '')), 'report')\n")
    stages = {"cold": {"cmd": "python stage.py", "deps": ["stage.py"], "outs": artifact_outs("artifacts/cold")},
              "report": {"cmd": "python stage.py", "deps": ["stage.py"], "outs": report_outs}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for args in (("init", "-q"), ("config", "core.analytics", "false"), ("repro", "-q")):
        done = dvc(tmp_path, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    kept = {k: v for k, v in snapshot(tmp_path).items() if k.startswith("reports/") or k.endswith(".run.json")}
    assert "artifacts/cold.run.json" in kept and "reports/README.md" in kept and "reports/plots/x.png" in kept
    (tmp_path / "FAIL").write_text("")
    assert dvc(tmp_path, "repro", "-f").returncode != 0
    assert {k: v for k, v in snapshot(tmp_path).items() if k in kept} == kept


# ---------------------------------------------------------------- staging folders
def test_a_killed_writers_staging_folder_is_removed_by_the_next_run(tmp_path):
    target = tmp_path / "eval" / "base-abc"
    killer = ("import os, signal, sys, pathlib\nfrom flowopd.runtime.artifacts import atomic_folder\n"
              f"with atomic_folder(pathlib.Path({str(target)!r})) as folder:\n"
              "    (folder / 'samples.jsonl').write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", killer], check=False).returncode == -9
    assert [p.name.startswith(".base-abc.staging-") for p in target.parent.iterdir()] == [True]
    write_artifact(target, "v1")
    assert sorted(p.name for p in target.parent.iterdir()) == ["base-abc", "base-abc.run.json"]


def test_a_running_writers_staging_folder_is_left_alone(tmp_path):
    target = tmp_path / "opd" / "abc"
    with staging_folder(target) as live:
        (live / "model.safetensors").write_text("being written")
        assert remove_stale_staging(target) == []
        write_artifact(target, "v1")  # another run of the same output cleans only dead writers' folders
        assert (live / "model.safetensors").read_text() == "being written"
    assert sorted(p.name for p in target.parent.iterdir()) == ["abc", "abc.run.json"]


# ---------------------------------------------------------------- the report and the ledger
def fake_build(version: str, fail: bool = False):
    """Writes what the report writes (tables, README.md, plots/ and grids/ folders), then fails if asked."""
    def build(shards, db, out, quality_benchmark):
        for name in ("main_table.md", "main_table.csv", "mar_table.md", "README.md"):
            artifacts.write_text(out / name, version)
        for folder in ("plots", "grids"):
            with atomic_folder(out / folder) as staging:
                (staging / "a.png").write_text(version)
        if fail:
            raise OSError(28, "No space left on device", str(out / "grids"))
        return SimpleNamespace(height=1)
    return build


@pytest.fixture
def reports(tmp_path, monkeypatch):
    """A reports folder holding a complete previous report (v1)."""
    out = tmp_path / "reports"
    monkeypatch.setattr(report_cli, "build", fake_build("v1"))
    assert report_cli.report_stage(["--db", str(out / "ledger.duckdb"), "--out", str(out), "shard"]) == 0
    return out


def test_a_failed_report_keeps_the_previous_one_whole(reports, monkeypatch, capsys):
    before = snapshot(reports)
    assert before["README.md"] == b"v1" and before["plots/a.png"] == b"v1"
    monkeypatch.setattr(report_cli, "build", fake_build("v2", fail=True))
    assert report_cli.report_stage(["--db", str(reports / "ledger.duckdb"), "--out", str(reports), "shard"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert snapshot(reports) == before  # nothing deleted, nothing half-new, no staging folder left


def test_the_report_and_the_ledger_cannot_run_at_once(reports, monkeypatch, capsys):
    db = reports / "ledger.duckdb"
    before = snapshot(reports)
    monkeypatch.setattr(report_cli, "build", fake_build("v2"))
    monkeypatch.setattr(artifacts, "LOCK_WAIT_SECONDS", 0.0)
    with ledger_lock(db):  # a ledger ingest (or another report) is running
        assert report_cli.report_stage(["--db", str(db), "--out", str(reports), "shard"]) == 1
        assert ledger_stage(["--db", str(db), "shard"]) == 1
    lines = capsys.readouterr().err.splitlines()
    refused = f"{db}.lock: held by process {os.getpid()} (the ledger or the report is running); try again when it ends"
    assert lines == [refused] * 2
    assert snapshot(reports) == before and not db.exists()


def test_the_second_of_report_and_ledger_waits_for_the_first(reports, monkeypatch, capsys):
    db = reports / "ledger.duckdb"
    monkeypatch.setattr(report_cli, "build", fake_build("v2"))
    held, release = threading.Event(), threading.Event()

    def ingest_running():
        with ledger_lock(db):
            held.set()
            release.wait()

    thread = threading.Thread(target=ingest_running)
    thread.start()
    held.wait()
    threading.Timer(0.3, release.set).start()
    assert report_cli.report_stage(["--db", str(db), "--out", str(reports), "shard"]) == 0
    thread.join()
    assert "waiting for process" in capsys.readouterr().err
    assert snapshot(reports)["README.md"] == b"v2" and snapshot(reports)["plots/a.png"] == b"v2"

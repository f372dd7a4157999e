"""Artifact folders: written atomically, holding only what their inputs determine; each run's provenance beside.

Inside an output folder (what DVC hashes): the phase's files, `spec.json` (the resolved sub-spec the phase read)
and `meta.json` (its hash and facts that follow from the inputs: input folders and their weights' sha256, parameter
counts, routing counts, the weights' sha256). So a rerun on the same inputs writes the same bytes, DVC sees the same
hash, and nothing downstream reruns (its run cache can match too).

Beside it, `<folder>.run.json`, the run record (a DVC output without cache that no stage depends on): what varies
from run to run: the spec file the stage ran from (name, label, whole-spec hash), start and finish times, seconds,
the process's start-up seconds (to the phase's clock; and to the end of torch's and the model library's import),
process count, host, git revision and dirty flag, package versions, device, and the training curve's timing
columns. The ledger reads it beside every folder it ingests. "Dirty" means the code or the specs differ from the
commit (SOURCE_PATHS), not that DVC rewrote dvc.lock or reports/ during the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from flowopd.launch import imports_done

UMASK = os.umask(0)
os.umask(UMASK)
PACKAGES = ("flowopd", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow", "tesserocr")
RUN_RECORD = ".run.json"  # suffix of the run record beside an output folder
STAGED_RUN_RECORD = ".run.json"  # its name inside the staging folder, moved out when the folder is committed
# write_provenance keywords that describe the run, not the result: they go to the run record, never into meta.json
RUN_FACTS = ("spec_name", "spec_label", "spec_hash", "processes", "started", "finished", "seconds", "train_seconds")
# A run is "dirty" when these differ from the commit (tracked changes or new files): the code and the specs, not
# what DVC rewrites while it runs (dvc.lock, reports/, .gitignore files) or the artifacts.
SOURCE_PATHS = ("flowopd", "stages", "specs", "pyproject.toml", "dvc.yaml", "sd3/dvc.yaml")


def git_state(cwd: Path | None = None) -> dict:
    """Revision and dirty flag (code or specs differ from the revision, SOURCE_PATHS); None outside a checkout."""

    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    rev = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=normal", "--", *SOURCE_PATHS)
    return {"git_rev": rev, "git_dirty": None if status is None else bool(status)}


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = "cpu"
    if "torch" in sys.modules:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "packages": versions,
        "device": device,
    }


def process_started() -> float | None:
    """When this process started (epoch seconds, to the kernel's 10 ms tick), or None off Linux. From its age
    (/proc/self/stat's start tick against CLOCK_BOOTTIME), not from the boot time, which /proc gives in whole
    seconds."""
    try:
        with open("/proc/self/stat") as handle:
            start_tick = int(handle.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_tick / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def canonical_hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file in the same folder, then rename), with ordinary permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o666 & ~UMASK)  # temp files are private; the artifact should not be
    os.replace(handle.name, path)


def write_json(path: Path, data) -> None:
    """Sorted keys, 2-space indent, Python's shortest round-trip floats: the same data gives the same bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_record_path(folder: Path) -> Path:
    """`<folder>.run.json`: the run record beside an output folder."""
    folder = Path(folder)
    return folder.with_name(folder.name + RUN_RECORD)


def read_run_record(folder: Path) -> dict | None:
    """The run record beside `folder`, None if there is none (a folder from before run records, or copied alone)."""
    path = run_record_path(folder)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on failure it is removed.

    A killed stage therefore never leaves a half-written artifact where DVC or a later phase would read it. A run
    record staged inside (write_provenance) is moved beside the folder first, so the folder never holds it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o777 & ~UMASK)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staged = staging / STAGED_RUN_RECORD
    if staged.exists():
        os.replace(staged, run_record_path(target))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def is_timing(column: str) -> bool:
    """Curve columns that measure time (`seconds`, `rollout_s`, ...): run provenance, not results."""
    return column == "seconds" or column.endswith("_s")


def curve_without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in rows]


def curve_timing(rows: list[dict]) -> list[dict]:
    """Each row's step and timing columns (the run record keeps them; the ledger puts them back into `curves`)."""
    return [{"step": row["step"]} | {k: v for k, v in row.items() if is_timing(k)} for row in rows
            if any(is_timing(k) for k in row)]


def write_provenance(folder: Path, phase: str, sub_spec: dict, curve: list[dict] | None = None, **extra) -> dict:
    """Write spec.json and meta.json into an artifact folder and stage its run record; returns the meta.

    meta.sections_hash keys the artifact (sha256 of spec.json's canonical JSON). Keywords in RUN_FACTS (the spec
    the stage ran from, times, seconds, process count) and `curve`'s timing columns go to the run record with the
    git state and the environment; every other keyword must follow from the inputs and goes into meta.json.
    """
    folder = Path(folder)
    finished = time.time()
    write_json(folder / "spec.json", sub_spec)
    meta = {"phase": phase, "sections_hash": canonical_hash(sub_spec),
            **{k: v for k, v in extra.items() if k not in RUN_FACTS}}
    write_json(folder / "meta.json", meta)
    run = {"phase": phase, "sections_hash": meta["sections_hash"], "finished": now(),
           **{k: v for k, v in extra.items() if k in RUN_FACTS}, **git_state(), **environment(),
           "argv": sys.argv, "curve_timing": curve_timing(curve or [])}
    started = process_started()
    if started is not None:
        run["process_started"] = datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds")
        if isinstance(extra.get("seconds"), int | float):  # the phase's clock started `seconds` before now
            run["startup_seconds"] = round(finished - extra["seconds"] - started, 3)
        if imports_done() is not None:  # process start to the end of torch's and the model library's import
            run["import_seconds"] = round(imports_done() - started, 3)
    write_json(folder / STAGED_RUN_RECORD, run)
    return meta

"""Artifact folders: written atomically, holding only what their inputs determine.

Inside an output folder (what DVC hashes): the phase's files, `spec.json` (the resolved sub-spec the phase read)
and `meta.json` (its hash and facts that follow from the inputs: input folders and their weights' sha256, parameter
counts, routing counts, the weights' sha256). So a rerun on the same inputs writes the same bytes, DVC sees the same
hash, and nothing downstream reruns (its run cache can match too). What varies from run to run goes to the run
record beside the folder (flowopd.runtime.records).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from flowopd.runtime.launch import imports_done
from flowopd.runtime.records import (
    RUN_FACTS,
    STAGED_RUN_RECORD,
    curve_timing,
    curve_without_timing,
    environment,
    git_state,
    process_started,
    run_record_path,
)
from flowopd.spec.hashing import canonical_hash, spec_hash

UMASK = os.umask(0)


os.umask(UMASK)


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


def write_curve(path: Path, rows: list[dict]) -> None:
    """A training curve as CSV, without its timing columns (they vary run to run: the run record keeps them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = curve_without_timing(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def spec_identity(spec) -> dict:
    """The spec a stage ran from (run-record facts: shared stages run from the first spec that has them)."""
    return {"spec_name": spec.name, "spec_label": spec.label, "spec_hash": spec_hash(spec)}

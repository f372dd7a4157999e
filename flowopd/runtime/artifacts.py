"""Artifact folders: written atomically, holding only what their inputs determine.

Inside an output folder (what DVC hashes): the phase's files, `spec.json` (the resolved sub-spec the phase read)
and `meta.json` (its hash and facts that follow from the inputs: input folders and their weights' sha256, parameter
counts, routing counts, the weights' sha256). So a rerun on the same inputs writes the same bytes, DVC sees the same
hash, and nothing downstream reruns. What varies from run to run goes to the run
record beside the folder (flowopd.runtime.records).

meta.json's `files` holds the sha256 of every other file of the folder; every phase checks the folders it reads
against it (verify_artifact) before any compute. A folder is staged in a locked hidden folder beside its target, so
the next run can tell a killed writer's leftovers from a live one's (remove_stale_staging).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import glob
import hashlib
import io
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
from flowopd.spec.hashing import canonical_hash

UMASK = os.umask(0)


os.umask(UMASK)
META = "meta.json"
FILES = "files"  # meta.json's {relative path: sha256} of every other file in the folder
STAGING = ".staging-"  # `.<target name>.staging-XXXX`: a folder being written beside its target
LOCK_WAIT_SECONDS = 600.0  # how long the ledger or the report waits for the other to finish


class ArtifactError(SystemExit):
    """An input artifact that is not what its producer wrote (a SystemExit: the stage stops with one line)."""


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
    """Yield a staging folder beside `target`; on success it replaces `target`, on failure it is removed.

    A killed stage therefore never leaves a half-written artifact where DVC or a later phase would read it, and its
    staging folder is removed by the next run of the same output. A run record staged inside (write_provenance) is
    moved beside the folder first, so the folder never holds it; the previous record stays until then.
    """
    target = Path(target)
    with staging_folder(target) as staging:
        os.chmod(staging, 0o777 & ~UMASK)
        yield staging
        staged = staging / STAGED_RUN_RECORD
        if staged.exists():
            os.replace(staged, run_record_path(target))
        replace_path(staging, target)


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new private folder `.<name>.staging-XXXX` beside `target`, locked while this process writes it and removed
    when the block ends unless moved away; stale ones of `target` (their writer is dead) are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    lock = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends or the block does, however it ends
        staging = target.parent / f".{target.name}{STAGING}{fresh.name.rpartition('-')[2]}"
        os.rename(fresh, staging)  # takes the name the cleaner looks for only once locked
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # nothing left if it was moved into place
    finally:
        os.close(lock)


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove `target`'s staging folders whose writer is gone (a killed run); returns them. A live writer holds an
    flock on its folder, which the kernel releases when the process dies, so a pid (reused, or another host's) is
    never trusted; a running writer's folder is left alone."""
    removed = []
    for path in sorted(Path(target).parent.glob(f".{glob.escape(Path(target).name)}{STAGING}*")):
        if path.is_symlink() or not path.is_dir():
            continue
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its writer is running
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def replace_path(source: Path, target: Path) -> None:
    """Move a file or folder over `target`, which is always whole: the old one or the new one. A folder cannot be
    swapped in one call: the old one steps aside under a staging name (removed by the next run if this one is
    killed in between) just before the new one moves in."""
    source, target = Path(source), Path(target)
    if target.is_dir() and not target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING}old-", dir=target.parent))
        os.replace(target, aside)  # onto an empty folder: allowed
        os.replace(source, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the block, waiting up to `wait` seconds (default
    LOCK_WAIT_SECONDS) for its holder, whose pid the file names; then a TimeoutError naming the file and the holder."""
    path, wait = Path(path), LOCK_WAIT_SECONDS if wait is None else wait
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, noted = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.EWOULDBLOCK, f"held by process {holder} (the ledger or the report is "
                                       "running); try again when it ends", str(path)) from None
                if not noted:
                    print(f"{path}: waiting for process {holder} to finish", file=sys.stderr)
                    noted = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def write_provenance(folder: Path, phase: str, sub_spec: dict, curve: list[dict] | None = None, **extra) -> dict:
    """Write spec.json and meta.json into an artifact folder and stage its run record; returns the meta.

    meta.sections_hash keys the artifact (sha256 of spec.json's canonical JSON); meta.files holds the sha256 of
    every file written so far (so call it last). Keywords in RUN_FACTS (the spec
    the stage ran from, times, seconds, process count) and `curve`'s timing columns go to the run record with the
    git state and the environment; every other keyword must follow from the inputs and goes into meta.json.
    """
    folder = Path(folder)
    finished = time.time()
    write_json(folder / "spec.json", sub_spec)
    meta = {"phase": phase, "sections_hash": canonical_hash(sub_spec),
            **{k: v for k, v in extra.items() if k not in RUN_FACTS}, FILES: file_hashes(folder)}
    write_json(folder / META, meta)
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
    """A training curve as CSV, without its timing columns (they vary run to run: the run record keeps them);
    written atomically, as it may sit in reports/ beside the previous run's."""
    rows = curve_without_timing(rows)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in an artifact folder but meta.json and a staged run record."""
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in _listing(folder)}


def _listing(folder: Path) -> list[str]:
    paths = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return [name for p in paths if (name := p.relative_to(folder).as_posix()) not in (META, STAGED_RUN_RECORD)]


def verify_artifact(folder: Path) -> dict[str, str]:
    """Check every file of an input artifact folder against the sha256 its producer recorded in meta.json, before
    a phase reads it; returns the recorded hashes. A changed, missing or unrecorded file stops the phase
    (ArtifactError) with the file named and both hashes."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / META).read_text(encoding="utf-8"))[FILES]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ArtifactError(f"{folder}: {META} records no file hashes: not an artifact folder written by this "
                            "version; rerun the stage that writes it") from None
    present = _listing(folder)
    for name in present:
        if name not in recorded:
            raise ArtifactError(f"{folder / name}: not among the files its producer recorded in {META}; refusing a "
                                "file added after the stage wrote the folder")
    for name, expected in sorted(recorded.items()):
        if name not in present:
            raise ArtifactError(f"{folder / name}: missing; its producer recorded sha256 {expected}")
        actual = sha256_file(folder / name)
        if actual != expected:
            raise ArtifactError(f"{folder / name}: sha256 {actual} differs from {expected}, recorded by its "
                                f"producer in {META}; refusing a changed artifact: rerun its stage or restore it "
                                "(dvc checkout)")
    return recorded


def spec_identity(spec) -> dict:
    """The spec a stage ran from (run-record facts: shared stages run from the first spec that has them). A
    training seed's spec (Spec.for_training_seed) names the spec file's hash and the seed index too."""
    identity = {"spec_name": spec.name, "spec_label": spec.label, "spec_hash": spec.source_hash}
    return identity if spec.training_seed is None else identity | {"training_seed": spec.training_seed}

"""Artifact folders: written atomically, each carrying the resolved sub-spec it came from and its provenance.

Every output folder holds `spec.json` (the resolved part of the spec the phase depends on), `meta.json` (its hash,
the git revision and dirty flag, package versions, device) and whatever the phase wrote.
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
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

UMASK = os.umask(0)
os.umask(UMASK)
PACKAGES = ("flowopd", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow", "tesserocr")


def git_state(cwd: Path | None = None) -> dict:
    """Revision and dirty flag of the working tree (None outside a git checkout)."""

    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    rev = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
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
        "packages": versions,
        "device": device,
    }


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
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on failure it is removed.

    A killed stage therefore never leaves a half-written artifact where DVC or a later phase would read it.
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
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_provenance(folder: Path, phase: str, sub_spec: dict, **extra) -> dict:
    """Write spec.json (the sections the phase read) and meta.json into an artifact folder; returns the meta.

    meta.sections_hash keys the artifact (sha256 of spec.json's canonical JSON); callers add spec_name and
    spec_hash (the whole resolved spec the stage ran from), timings and artifact hashes.
    """
    folder = Path(folder)
    write_json(folder / "spec.json", sub_spec)
    meta = {"phase": phase, "sections_hash": canonical_hash(sub_spec), **git_state(), **environment(), **extra}
    write_json(folder / "meta.json", meta)
    return meta

"""Run records: what varies from one run of a stage to the next, kept beside its output folder, never inside.

`<folder>.run.json` (a persistent DVC output without cache that no stage depends on: DVC leaves the previous one
in place while the stage runs, and the stage replaces it only when it succeeds) holds the spec file the stage ran from
(name, label, whole-spec hash), start and finish times, seconds, the process's start-up seconds (to the phase's
clock; and to the end of torch's and the model library's import), process count, host, git revision and dirty flag,
package versions, device, and the training curve's timing columns. The ledger reads it beside every folder it
ingests. "Dirty" means the code or the specs differ from the commit (SOURCE_PATHS), not that DVC rewrote dvc.lock or
reports/ during the run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

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


def run_record_path(folder: Path) -> Path:
    """`<folder>.run.json`: the run record beside an output folder."""
    folder = Path(folder)
    return folder.with_name(folder.name + RUN_RECORD)


def read_run_record(folder: Path) -> dict | None:
    """The run record beside `folder`, None if there is none (a folder from before run records, or copied alone)."""
    path = run_record_path(folder)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_timing(column: str) -> bool:
    """Curve columns that measure time (`seconds`, `rollout_s`, ...): run provenance, not results."""
    return column == "seconds" or column.endswith("_s")


def curve_without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in rows]


def curve_timing(rows: list[dict]) -> list[dict]:
    """Each row's step and timing columns (the run record keeps them; the ledger puts them back into `curves`)."""
    return [{"step": row["step"]} | {k: v for k, v in row.items() if is_timing(k)} for row in rows
            if any(is_timing(k) for k in row)]

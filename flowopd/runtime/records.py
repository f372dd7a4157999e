"""Run records: what varies from one run of a stage to the next, kept beside its output folder, never inside.

`<folder>.run.json` (a persistent DVC output without cache that no stage depends on: DVC leaves the previous one
in place while the stage runs, and the stage replaces it only when it succeeds) holds the spec file the stage ran from
(name, label, whole-spec hash), the training seed index (of a trained model, or of the model an evaluation scored;
none for data and base), start and finish times, seconds, the process's start-up seconds (to the phase's
clock; and to the end of torch's and the model library's import), process count, host, git revision and dirty flag,
package versions, device, the training curve's timing columns, and a model's training `budget` (what it cost,
counted while the phase ran: see `budget`). The ledger reads it beside every folder it ingests. "Dirty" means the
code or the specs differ from the commit (SOURCE_PATHS), not that DVC rewrote dvc.lock or reports/ during the run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import weakref
from importlib import metadata
from pathlib import Path

PACKAGES = ("flowopd", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow", "tesserocr")
RUN_RECORD = ".run.json"  # suffix of the run record beside an output folder
STAGED_RUN_RECORD = ".run.json"  # its name inside the staging folder, moved out when the folder is committed


# write_provenance keywords that describe the run, not the result: they go to the run record, never into meta.json
RUN_FACTS = ("spec_name", "spec_label", "spec_hash", "training_seed", "processes", "started", "finished", "seconds",
             "train_seconds", "budget")


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


# ---------------------------------------------------------------- training budgets
BUDGET = ("images", "forwards", "optimizer_steps", "cpu_s")
COUNTED = BUDGET[:3]  # tallied where the work happens; cpu_s is read from the clock
_METERS: weakref.WeakSet = weakref.WeakSet()  # every live Meter counts


def cpu_seconds() -> float:
    """This process's CPU seconds (all its threads) and those of its children that have ended (an OCR binary)."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


class Meter:
    """What a phase spends from the moment its Meter is made until it is dropped: images generated by any model
    (rollouts, SFT targets), transformer forward rows (a forward over B rows counts B, with CFG 2B; teachers' and
    the anchor's included), optimizer steps, and this process's CPU seconds. The counts are tallied where the work
    happens (flowopd.models.bundle.transformer_velocity, the rollouts, the SFT sampler, the trainers) by adding
    integers, nothing else, so the weights are the same with or without a meter; with none alive nothing is counted.
    Each process counts its own work; the phase sums them (flowopd.train.trainer.spent)."""

    def __init__(self):
        self.counts = dict.fromkeys(COUNTED, 0)
        self.cpu_start = cpu_seconds()
        self.known = True  # False once a resumed run could not carry over what it had spent
        _METERS.add(self)

    def spent(self) -> dict | None:
        """This process's spending so far; None when unknown."""
        return {**self.counts, "cpu_s": cpu_seconds() - self.cpu_start} if self.known else None

    def carry(self, spent: dict | None, add: bool = True) -> None:
        """A resumed run: count what the killed one had spent up to its checkpoint (every process's, so only one
        process adds it: `add`); a checkpoint without it (None, written before budgets) leaves the spending
        unknown."""
        if spent is None:
            self.known = False
        elif add:
            for key in COUNTED:
                self.counts[key] += int(spent[key])
            self.cpu_start -= spent["cpu_s"]


def tally(key: str, n: int = 1) -> None:
    """Count n `key` ("images", "forwards", "optimizer_steps") on every live meter."""
    for meter in _METERS:
        meter.counts[key] += n


def budget(own: dict | None, parents=(), shared_base: bool = False) -> dict | None:
    """A trained model's `budget` for its run record, None when its own spending is unknown.

    `own`: what its phase spent (every process's); `lineage`: the own spending of every model folder it descends
    from (`parents`: the folders the phase started from or learned from), theirs and their lineages' by artifact
    key (meta.json's sections_hash), so a teacher reached through the cold start and directly counts once;
    `total`: own + lineage. The base is in no lineage: it plays the pretrained model every row shares (SD3.5-M), so
    the base's own budget (shared_base) has total 0. A parent without a budget (a folder from before budgets)
    leaves lineage and total None (unknown), never a partial sum."""
    if own is None:
        return None
    own = {key: int(own[key]) for key in COUNTED} | {"cpu_s": round(float(own["cpu_s"]), 3)}
    lineage: dict | None = {}
    for parent in (p for p in parents if p is not None):
        meta = json.loads((Path(parent) / "meta.json").read_text(encoding="utf-8"))
        if meta.get("phase") == "base":
            continue
        spent = (read_run_record(parent) or {}).get("budget")
        if not isinstance(spent, dict) or spent.get("lineage") is None:
            lineage = None
            break
        own_entry = {"phase": meta["phase"]} | {key: spent[key] for key in BUDGET}
        lineage |= spent["lineage"] | {meta["sections_hash"]: own_entry}
    if shared_base:
        lineage, total = {}, {**dict.fromkeys(COUNTED, 0), "cpu_s": 0.0}
    elif lineage is None:
        total = None
    else:
        total = {key: own[key] + sum(entry[key] for entry in lineage.values()) for key in BUDGET}
        total["cpu_s"] = round(total["cpu_s"], 3)
    return {**own, "lineage": lineage, "total": total}

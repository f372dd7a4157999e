"""`flowopd pipeline run -j N`: `dvc repro` with up to N stages running side by side.

`dvc repro` runs one stage at a time. DVC's documented way to run more is one `dvc repro --single-item STAGE` per
stage: it releases the repository lock while the stage's command runs and records the stage in dvc.lock when it ends.
This runner does that in dependency order:
- which stages: those `dvc status` reports changed (or never run), and every stage downstream of them, whose inputs
  are about to change. Each still goes through `dvc repro --single-item`, which skips it when its inputs came out
  the same. A pipeline that is up to date costs one `dvc status`.
- order: a stage starts once every stage it depends on (a dependency that is, or lies under, another stage's output)
  has finished, in dvc.yaml's order among those ready, while it fits in the N slots: a training stage takes one (it
  computes on one thread), the base and an evaluation take all N (they compute on every core), so they run alone.
- output: each stage's output goes to `logs/<stage>.log` in the project folder (`tail -f` shows its progress bar);
  the terminal shows one bar over the stages and a line per finished stage with its seconds; `logs/run.json` holds
  each stage's start, end (epoch seconds) and exit status (`benchmarks/bench_pipeline.py records` reads it).
- a failure: no further stage starts, the running ones finish and are recorded, the failed stage's log tail is
  printed and the exit status is 1. Running again resumes: finished stages are up to date. Ctrl-C or `kill`
  stops the running stages (SIGINT, then SIGTERM and SIGKILL to what outlives it) before the runner exits.
Results do not depend on N: a training stage computes on one thread whatever runs beside it
(flowopd.phases.stage_cli.STAGE_THREADS), the base and the evaluations on every core.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import yaml

from flowopd.phases.stage_cli import ALL_CORES_PHASES

LOG_FOLDER = "logs"
STAGE_SCRIPT = re.compile(r"\bstages/(\w+)\.py\b")
TIMELINE = "run.json"
POLL_SECONDS = 0.2
STOP_GRACE = 10.0  # seconds a stage gets to exit after each signal of an interrupted run
LOG_TAIL_LINES = 20


class RunnerError(RuntimeError):
    """The pipeline could not be read or its state could not be determined (not a stage failure)."""


def _paths(entries) -> list[str]:
    """dvc.yaml's outs / metrics / plots / deps entries: strings or one-key mappings {path: options}."""
    return [os.path.normpath(e if isinstance(e, str) else next(iter(e))) for e in entries or ()]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def read_stages(dvc_yaml: Path) -> dict[str, dict]:
    """dvc.yaml's stages, in its order."""
    try:
        return (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as err:
        raise RunnerError(f"cannot read {dvc_yaml}: {err}") from None


def stage_graph(stages: dict[str, dict]) -> dict[str, set[str]]:
    """Stage -> the stages whose outputs it depends on."""
    producers = {path: name for name, stage in stages.items()
                 for key in ("outs", "metrics", "plots") for path in _paths(stage.get(key))}
    graph = {}
    for name, stage in stages.items():
        deps = _paths(stage.get("deps"))
        graph[name] = {producer for path, producer in producers.items() if producer != name
                       and any(_inside(dep, path) or _inside(path, dep) for dep in deps)}
    return graph


def stage_slots(stages: dict[str, dict], jobs: int) -> dict[str, int]:
    """Stage -> slots it takes: all `jobs` for a phase that computes on every core (its command runs
    `stages/<phase>.py`, phase in ALL_CORES_PHASES), else one."""
    slots = {}
    for name, stage in stages.items():
        found = STAGE_SCRIPT.search(str(stage.get("cmd", "")))
        slots[name] = jobs if found and found.group(1) in ALL_CORES_PHASES else 1
    return slots


def downstream(graph: dict[str, set[str]], roots: set[str]) -> set[str]:
    """`roots` and every stage that depends on one of them, directly or not."""
    users: dict[str, set[str]] = {name: set() for name in graph}
    for name, upstream in graph.items():
        for producer in upstream:
            users[producer].add(name)
    found, queue = set(roots), deque(roots)
    while queue:
        for user in users[queue.popleft()] - found:
            found.add(user)
            queue.append(user)
    return found


def dvc_executable() -> str:
    """The dvc beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    found = str(beside) if beside.exists() else shutil.which("dvc")
    if not found:
        raise RunnerError("dvc not found (install the project: make setup)")
    return found


def changed_stages(project: Path, dvc: str) -> set[str]:
    """The stages `dvc status` reports changed or never run."""
    done = subprocess.run([dvc, "status", "--json"], cwd=project, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RunnerError(f"dvc status failed in {project}:\n{done.stderr.strip()}")
    try:
        status = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        raise RunnerError(f"dvc status printed no JSON in {project}: {done.stdout[:200]!r}") from None
    return {key.rpartition(":")[2] for key in status}  # "dvc.yaml:stage" in a project with several files


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n") if path.exists() else ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop(processes: list[subprocess.Popen]) -> None:
    """Stop running stages (each its own process group): SIGINT, which lets dvc and the stage clean up, then SIGTERM
    and SIGKILL for what is still alive after STOP_GRACE seconds each (a process started with SIGINT ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [process for process in processes if process.poll() is None]
        if alive and sig != signal.SIGINT:
            print(f"{len(alive)} stage(s) outlived SIGINT; sending {sig.name}. If dvc then reports an output busy by a "
                  f"PID that no longer exists, remove .dvc/tmp/rwlock (dvc's own advice).", file=sys.stderr)
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while any(process.poll() is None for process in alive) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)


def run(project: Path = Path("."), jobs: int = 1, progress: bool = True) -> int:
    """Reproduce the project's pipeline with up to `jobs` stages at once; 0 when every stage succeeded, else 1."""
    from tqdm import tqdm

    if jobs < 1:
        raise RunnerError(f"jobs must be at least 1, got {jobs}")
    project = Path(project)
    stages = read_stages(project / "dvc.yaml")
    graph, slots = stage_graph(stages), stage_slots(stages, jobs)
    dvc = dvc_executable()
    stale = downstream(graph, changed_stages(project, dvc) & graph.keys())
    todo = [name for name in graph if name in stale]
    if not todo:
        print("Data and pipelines are up to date.")
        return 0
    # Stage commands call `python`: this one's (the venv's), whatever the caller's PATH says, as make repro does.
    env = os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    logs = project / LOG_FOLDER
    logs.mkdir(exist_ok=True)
    pending, running, finished, failed = list(todo), {}, set(), []
    timeline: dict[str, dict] = {}
    bar = tqdm(total=len(todo), desc=f"stages (-j {jobs})", unit="stage", disable=not progress, dynamic_ncols=True)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stages as Ctrl-C does
    try:
        while pending or running:
            for name, (process, started, log) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                seconds = time.monotonic() - started
                timeline[name] |= {"ended": time.time(), "exit": process.returncode}
                if process.returncode == 0:
                    finished.add(name)
                    tqdm.write(f"done    {name}  {seconds:.1f} s")
                else:
                    failed.append(name)
                    tqdm.write(f"FAILED  {name}  (exit {process.returncode}, {seconds:.1f} s): "
                               f"{logs / (name + '.log')}")
                bar.update()
            free = jobs - sum(slots[name] for name in running)
            ready = [name for name in pending if graph[name] & set(todo) <= finished and slots[name] <= free]
            while ready and not failed:
                name = ready.pop(0)
                pending.remove(name)
                free -= slots[name]
                ready = [other for other in ready if slots[other] <= free]
                log = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed when the stage ends)
                process = subprocess.Popen([dvc, "--wait-for-lock", "repro", "--single-item", name], cwd=project,
                                           env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                running[name] = (process, time.monotonic(), log)
                timeline[name] = {"started": time.time()}
                tqdm.write(f"start   {name}")
            if failed and not running:
                break
            bar.set_postfix_str(", ".join(running), refresh=False)
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        stop([process for process, _, _ in running.values()])
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        (logs / TIMELINE).write_text(json.dumps({"jobs": jobs, "stages": timeline}, indent=1) + "\n")
    for name in failed:
        print(f"\n--- {name}: last lines of {logs / (name + '.log')}\n{_tail(logs / (name + '.log'))}",
              file=sys.stderr)
    if failed:
        skipped = len(pending)
        print(f"\n{len(failed)} stage(s) failed; {len(finished)} finished, {skipped} not started. "
              f"Fix and run again: finished stages are kept.", file=sys.stderr)
        return 1
    return 0

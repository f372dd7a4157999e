"""How a stage command is launched: one process, or several under `accelerate launch`. No torch here, so stages
that never split (data) start without it.

The stages that split over processes (teacher, baseline, opd, an sft cold start, eval) start themselves again under
`accelerate launch` when asked, with the same arguments, so a dvc.yaml command stays `python stages/<phase>.py ...`
and the process count never enters a stage key:
- `FLOWOPD_PROCESSES=N`: N processes on this machine (one per GPU; without GPUs, N CPU processes over gloo);
- `FLOWOPD_ACCELERATE_CONFIG=FILE`: an accelerate config file (`accelerate config --config_file FILE` writes one;
  processes, GPUs, mixed precision "no": the spec's model.dtype rules); FLOWOPD_PROCESSES, if set too, overrides its
  process count.
Unset (or FLOWOPD_PROCESSES=1), a stage runs in one process and never imports accelerate.
"""

from __future__ import annotations

import gc
import os
import sys
import time

_GC_PAUSED = False
_IMPORTS_DONE: float | None = None  # epoch seconds when resume_gc() ended the paused imports
PROCESSES_ENV = "FLOWOPD_PROCESSES"
ACCELERATE_CONFIG_ENV = "FLOWOPD_ACCELERATE_CONFIG"
LAUNCHED_ENV = "FLOWOPD_LAUNCHED"


def launched_world_size() -> int:
    """Processes in this job as the launcher announced them (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_several_processes(phase: str) -> None:
    """Phases without a data-parallel split (data, base, a merge cold start) would each run whole in every process
    and race to write one output: stop them under a multi-process launch."""
    if launched_world_size() > 1:
        raise SystemExit(f"the {phase} phase runs in one process; launch it without accelerate / torchrun "
                         f"(teacher, baseline, opd, an sft cold start and eval split over processes)")


def launch_command(argv: list[str]) -> list[str] | None:
    """The `accelerate launch` command that reruns this stage as asked by the environment; None: one process."""
    requested, config = os.environ.get(PROCESSES_ENV), os.environ.get(ACCELERATE_CONFIG_ENV)
    if requested is not None and (not requested.isdigit() or int(requested) < 1):
        raise SystemExit(f"{PROCESSES_ENV} must be a positive integer, got {requested!r}")
    if config:
        if not os.path.isfile(config):
            raise SystemExit(f"{ACCELERATE_CONFIG_ENV}: no accelerate config file {config!r}")
        count = ["--num_processes", requested] if requested else []
        options = ["--config_file", config, *count]
    elif requested is not None and int(requested) > 1:
        options = ["--multi_gpu", "--num_processes", requested, "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no"]
    else:
        return None
    return [sys.executable, "-m", "accelerate.commands.launch", *options, sys.argv[0], *argv]


def relaunch_if_asked(argv: list[str] | None = None) -> None:
    """Under FLOWOPD_PROCESSES=N > 1 or FLOWOPD_ACCELERATE_CONFIG, with no launcher around us yet, replace this
    process by `accelerate launch` running the same stage command."""
    command = launch_command(sys.argv[1:] if argv is None else argv)
    if command is None or launched_world_size() > 1 or os.environ.get(LAUNCHED_ENV):
        return
    os.environ[LAUNCHED_ENV] = "1"  # the launched processes (even a single one) must not launch again
    sys.stdout.flush()
    os.execv(sys.executable, command)


def pause_gc() -> None:
    """Stage entry points, before torch: no cyclic garbage collection until `resume_gc()`.

    Why: torch and diffusers build about 640,000 objects on import, and CPython's collector rescans all of them each
    time the heap has grown by a quarter, then once more at interpreter exit. Here that is about a quarter of the
    import time and 0.9 s of every stage's exit (`benchmarks/bench_pipeline.py startup`)."""
    global _GC_PAUSED
    if gc.isenabled():
        gc.disable()
        _GC_PAUSED = True


def resume_gc() -> None:
    """After the heavy imports (the model modules call it): freeze what exists so far, which the collector then never
    rescans (not at exit either), and collect as usual from here on. A no-op unless `pause_gc()` paused it."""
    global _GC_PAUSED, _IMPORTS_DONE
    if _GC_PAUSED:
        gc.freeze()
        gc.enable()
        _GC_PAUSED, _IMPORTS_DONE = False, time.time()


def imports_done() -> float | None:
    """When this stage process finished its heavy imports (epoch seconds), or None if it never paused for them."""
    return _IMPORTS_DONE

"""`flowopd pipeline write|check|run`: generate dvc.yaml and sd3/dvc.yaml from the spec files, check they are
current, or reproduce a pipeline with several stages side by side (flowopd.pipeline.runner)."""

from __future__ import annotations

import os
import sys


def default_jobs(project: str) -> int:
    """One stage per core for the tiny pipeline (each CPU stage computes on one thread); one for the GPU pipeline."""
    from flowopd.pipeline.dvc import TINY

    if os.path.normpath(project) != TINY.project:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pipeline_command(args) -> int:
    from flowopd.pipeline import dvc as pipeline
    from flowopd.spec import SpecError

    if args.action == "run":
        from flowopd.pipeline.runner import RunnerError, run

        try:
            return run(args.project, args.jobs or default_jobs(args.project))
        except RunnerError as error:
            print(error, file=sys.stderr)
            return 1
    try:
        if args.action == "write":
            notes = []
            changed = pipeline.write(notes=notes)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"{', '.join(changed)} updated" if changed else "dvc.yaml files already up to date")
            return 0
        if pipeline.stale():
            print("a dvc.yaml is stale: specs/ changed since it was written; run `flowopd pipeline write`")
            return 1
        print("dvc.yaml and sd3/dvc.yaml are up to date with specs/")
        return 0
    except SpecError as error:
        print(error, file=sys.stderr)
        return 1


def add_pipeline_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="generate or check dvc.yaml and sd3/dvc.yaml from the spec files, or run a pipeline")
    parser.add_argument("action", choices=["write", "check", "run"],
                        help="run: `dvc repro` with up to -j stages side by side, each logged to logs/<stage>.log")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="run: stages at once (default: one per core for the tiny pipeline, 1 for sd3)")
    parser.add_argument("--project", default=".", help="run: the DVC project folder (`.` or `sd3`)")
    parser.set_defaults(func=pipeline_command)

"""The command line every stage entry point shares (`stages/<phase>.py`, the commands dvc.yaml runs).

Options: `--spec` (the spec file), `--out` (the artifact folder, written atomically), `--no-progress`, and per phase
its inputs (`--base`, `--data`, `--teacher NAME=DIR`, `--init`, `--model`), side outputs (`--curve`, `--metrics`)
and, for the phases after the base, `--training-seed I` (absent: 0). Before any work, the spec is loaded (problems as
one line each, no traceback) and the output folder's name is checked against the stage key the spec gives now
(flowopd.phases.keys.check_stage_key).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowopd.phases.keys import check_stage_key
from flowopd.spec.validation import load_spec_or_exit

# torch's CPU threads in a training stage after the base (teacher, baseline, cold start, OPD). A weight gradient
# summed over 16 rows or more comes out in the last bits differently on 1 and on 2 threads (forwards agree), so a
# fixed count keeps a stage's artifact the same whether it runs alone or beside others (`flowopd pipeline run -j N`).
# One thread each, two training stages side by side do 1.1-1.3x the work of one on two threads (docs/pipeline.md).
# The base and the evaluation keep every core and the runner gives them the machine alone: everything waits for the
# base, and an evaluation's numbers then stay those it gives run alone (two one-thread evaluations side by side are
# about as fast as one after the other on two threads, docs/pipeline.md).
STAGE_THREADS = 1
ALL_CORES_PHASES = ("base", "eval")
UNPINNED_PHASES = ("data", *ALL_CORES_PHASES)  # data imports no torch


def stage_parser(phase: str) -> argparse.ArgumentParser:
    """--spec, --out, --no-progress."""
    parser = argparse.ArgumentParser(prog=f"stages/{phase}.py", description=f"run the {phase} phase of a spec")
    parser.add_argument("--spec", required=True, type=Path, help="spec YAML file")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def add_model_inputs(parser: argparse.ArgumentParser, *, data_required: bool, teachers: bool = False) -> None:
    """--base (tiny specs), --data, and with `teachers` the repeatable --teacher NAME=DIR."""
    parser.add_argument("--base", type=Path, help="base model artifact folder (tiny specs)")
    parser.add_argument("--data", required=data_required, type=Path, help="prompt sets folder (data phase)")
    if teachers:
        parser.add_argument("--teacher", action="append", metavar="NAME=DIR", help="a teacher artifact (repeatable)")


def add_curve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curve", type=Path, help="also write the training curve here (DVC plots)")


def add_training_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--training-seed", type=int, default=0, metavar="I",
                        help="which of the spec's training_seeds to train (0: the spec's seed; I: seed + I)")


def load_checked_spec(args: argparse.Namespace, phase: str, teacher: str | None = None):
    """The spec of `--spec`, after checking that `--out` is named for the stage key the spec gives this phase (and
    its `--training-seed`, one of the spec's)."""
    spec = load_spec_or_exit(args.spec)
    training_seed = getattr(args, "training_seed", 0)
    if not 0 <= training_seed < spec.training_seeds:
        raise SystemExit(f"--training-seed {training_seed}: {args.spec} has training_seeds {spec.training_seeds} "
                         f"(seeds 0 to {spec.training_seeds - 1})")
    check_stage_key(spec, args.spec, phase, args.out, teacher, training_seed)
    pin_threads(phase)
    return spec


def pin_threads(phase: str) -> None:
    """STAGE_THREADS torch threads for a CPU stage of `phase` (not for UNPINNED_PHASES, nor on a GPU)."""
    if phase in UNPINNED_PHASES:
        return
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(STAGE_THREADS)


def parse_teacher_dirs(values: list[str] | None, spec) -> dict[str, Path]:
    """['text=artifacts/teacher/abc', ...] -> {name: Path}; names must be the spec's teachers, each given once."""
    dirs: dict[str, Path] = {}
    for value in values or ():
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--teacher expects NAME=DIR, got {value!r}")
        if name not in spec.teachers:
            raise SystemExit(f"--teacher {name}: unknown teacher; the spec has {', '.join(spec.teachers)}")
        if name in dirs:
            raise SystemExit(f"--teacher {name} given twice")
        dirs[name] = Path(folder)
    return dirs

"""Phase `teacher` (the paper's first stage): one task's reward on that task's train prompts, from the base.

    python stages/teacher.py --spec SPEC --teacher NAME [--training-seed I] [--base DIR] --data DIR --out DIR
        [--curve CSV]

The trainer is the teacher's `method.kind` (flowopd.methods.reward_trainers: Flow-GRPO or DiffusionNFT).
FLOWOPD_PROCESSES=N runs it in N processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowopd.methods.reward_trainers import RewardPool, run_reward_phase
from flowopd.phases.keys import teacher_sub_spec
from flowopd.phases.stage_cli import (
    add_curve,
    add_model_inputs,
    add_training_seed,
    load_checked_spec,
    stage_parser,
)
from flowopd.runtime.artifacts import verify_artifact
from flowopd.runtime.launch import relaunch_if_asked


def run_teacher(spec, name: str, base_dir: Path | None, data_dir: Path, out: Path, curve_path: Path | None = None,
                progress: bool = True, training_seed: int = 0) -> None:
    """Teacher `name`: its task's reward on its task's train prompts, from the base, with the training seed's
    seed; writes `out` atomically."""
    from flowopd.rewards import task_reward
    from flowopd.world.prompt_sets import read_prompts, world_config

    teacher = spec.teachers[name]
    verify_artifact(data_dir)  # the base is checked as it loads (flowopd.models.loading)
    prompts = read_prompts(data_dir, teacher.task, "train")
    reward = task_reward(spec.tasks[teacher.task], world_config(spec))
    pool = RewardPool(prompts, np.zeros(len(prompts), dtype=int), [reward], [teacher.task], [1.0])
    run_reward_phase(spec.for_training_seed(training_seed), "teacher", teacher_sub_spec(spec, name, training_seed),
                     teacher.method, base_dir, out, curve_path, progress, pool, {"teacher": name, "task": teacher.task})


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        relaunch_if_asked()
    parser = stage_parser("teacher")
    parser.add_argument("--teacher", required=True, help="teacher name (a key of the spec's `teachers`)")
    add_model_inputs(parser, data_required=True)
    add_curve(parser)
    add_training_seed(parser)
    args = parser.parse_args(argv)
    spec = load_checked_spec(args, "teacher", args.teacher)
    if args.teacher not in spec.teachers:
        raise SystemExit(f"unknown teacher {args.teacher!r}; the spec has {', '.join(spec.teachers)}")
    run_teacher(spec, args.teacher, args.base, args.data, args.out, args.curve, not args.no_progress,
                args.training_seed)

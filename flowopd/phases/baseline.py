"""Phase `baseline`: mixed-reward training, one policy on every weighted task, the see-saw baseline Flow-OPD must
beat (`mixed_grpo` in the report). Give it the teachers' method so the comparison is fair.

    python stages/baseline.py --spec SPEC [--training-seed I] [--base DIR] --data DIR --out DIR [--curve CSV]

Each task's reward scores the samples of its own prompts (their dataset of origin); advantages combine them as
`baseline.advantage` says (flowopd.train.rollouts.mixed_advantages). FLOWOPD_PROCESSES=N runs it in N processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowopd.methods.reward_trainers import RewardPool, run_reward_phase
from flowopd.phases.keys import baseline_sub_spec
from flowopd.phases.stage_cli import (
    add_curve,
    add_model_inputs,
    add_training_seed,
    load_checked_spec,
    stage_parser,
)
from flowopd.runtime.artifacts import verify_artifact
from flowopd.runtime.launch import relaunch_if_asked


def run_baseline(spec, base_dir: Path | None, data_dir: Path, out: Path, curve_path: Path | None = None,
                 progress: bool = True, training_seed: int = 0) -> None:
    """The mixed-reward baseline on all weighted tasks' train prompts (zero-weight tasks are left out), with the
    training seed's seed."""
    from flowopd.rewards import task_reward
    from flowopd.world.prompt_sets import read_prompts, world_config

    baseline = spec.baseline
    if baseline is None:
        raise SystemExit("the spec has no baseline section")
    names = [task for task, weight in baseline.weights.items() if weight > 0]
    verify_artifact(data_dir)  # the base is checked as it loads (flowopd.models.loading)
    prompts, tasks = [], []
    for k, task in enumerate(names):
        task_prompts = read_prompts(data_dir, task, "train")
        prompts += task_prompts
        tasks += [k] * len(task_prompts)
    rewards = [task_reward(spec.tasks[task], world_config(spec)) for task in names]
    pool = RewardPool(prompts, np.array(tasks), rewards, names, [baseline.weights[task] for task in names],
                      baseline.advantage)
    run_reward_phase(spec.for_training_seed(training_seed), "baseline", baseline_sub_spec(spec, training_seed),
                     baseline.method, base_dir, out, curve_path, progress, pool, {"tasks": names})


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        relaunch_if_asked()
    parser = stage_parser("baseline")
    add_model_inputs(parser, data_required=True)
    add_curve(parser)
    add_training_seed(parser)
    args = parser.parse_args(argv)
    run_baseline(load_checked_spec(args, "baseline"), args.base, args.data, args.out, args.curve, not args.no_progress,
                 args.training_seed)

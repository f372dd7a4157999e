"""Stage 1 phases trained on rewards: a task teacher (one task's reward) and the mixed-reward baseline (all tasks').

Both hand a pool of train prompts and their rewards to the reward trainer their spec section's `method.kind` names
(REWARD_TRAINERS: grpo, nft) and let flowopd.trainer run it and write the artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowopd.artifacts import now
from flowopd.distributed import Processes, relaunch_if_asked
from flowopd.grpo import GRPOTrainer
from flowopd.models.loading import load_bundle, weights_sha
from flowopd.phases import baseline_sub_spec, teacher_sub_spec
from flowopd.trainer import lora_settings, run_training


@dataclass
class RewardPool:
    """What a reward trainer trains on: the prompts, the index of each one's reward, the rewards, their names (the
    curve's reward_<name> columns), weights, and how advantages combine them ("joint" or "per_reward")."""

    prompts: list
    prompt_tasks: np.ndarray
    rewards: list
    names: list[str]
    weights: list[float]
    advantage: str = "joint"


def grpo_trainer(spec, bundle, settings, pool: RewardPool, lora, processes: Processes) -> GRPOTrainer:
    # On CPU the tiny model's velocities of a sub-batch are bitwise those of the whole batch, so training on the
    # kept groups only changes nothing but the time; SD3 on GPU keeps the sampling batch (method.md).
    return GRPOTrainer(bundle, settings, pool.prompts, pool.prompt_tasks, pool.rewards, pool.names, pool.weights,
                       advantage=pool.advantage, seed=spec.seed, lora=lora, kept_rows_only=spec.model.kind == "tiny",
                       processes=processes)


def nft_trainer(spec, bundle, settings, pool: RewardPool, lora, processes: Processes):
    from flowopd.nft import NFTTrainer

    return NFTTrainer(bundle, settings, pool.prompts, pool.prompt_tasks, pool.rewards, pool.names, pool.weights,
                      advantage=pool.advantage, seed=spec.seed, lora=lora, processes=processes)


# kind -> make(spec, bundle, settings, pool, lora, processes): a trainer of flowopd.trainer's skeleton
REWARD_TRAINERS = {"grpo": grpo_trainer, "nft": nft_trainer}


def training_method(section) -> tuple[str, object]:
    """(kind, settings) of a teacher's or the baseline's trainer: the spec's `method` section."""
    return section.method.kind, section.method


def run_teacher(spec, name: str, base_dir: Path | None, data_dir: Path, out: Path, curve_path: Path | None = None,
                progress: bool = True) -> None:
    """Teacher `name`: its task's reward on its task's train prompts, from the base; writes `out` atomically."""
    from flowopd.data import read_prompts
    from flowopd.rewards import task_reward

    teacher = spec.teachers[name]
    prompts = read_prompts(data_dir, teacher.task, "train")
    reward = task_reward(spec.tasks[teacher.task], _world(spec))
    pool = RewardPool(prompts, np.zeros(len(prompts), dtype=int), [reward], [teacher.task], [1.0])
    _run_phase(spec, "teacher", teacher_sub_spec(spec, name), teacher, base_dir, out, curve_path, progress, pool,
               {"teacher": name, "task": teacher.task})


def run_baseline(spec, base_dir: Path | None, data_dir: Path, out: Path, curve_path: Path | None = None,
                 progress: bool = True) -> None:
    """The mixed-reward baseline on all weighted tasks' train prompts (zero-weight tasks are left out)."""
    from flowopd.data import read_prompts
    from flowopd.rewards import task_reward

    baseline = spec.baseline
    if baseline is None:
        raise SystemExit("the spec has no baseline section")
    names = [task for task, weight in baseline.weights.items() if weight > 0]
    prompts, tasks = [], []
    for k, task in enumerate(names):
        task_prompts = read_prompts(data_dir, task, "train")
        prompts += task_prompts
        tasks += [k] * len(task_prompts)
    rewards = [task_reward(spec.tasks[task], _world(spec)) for task in names]
    pool = RewardPool(prompts, np.array(tasks), rewards, names, [baseline.weights[task] for task in names],
                      baseline.advantage)
    _run_phase(spec, "baseline", baseline_sub_spec(spec), baseline, base_dir, out, curve_path, progress, pool,
               {"tasks": names})


def _world(spec):
    from flowopd.data import world_config

    return world_config(spec)


def _run_phase(spec, phase, sub_spec, section, base_dir, out, curve_path, progress, pool: RewardPool, extra) -> None:
    started, start = now(), time.time()
    processes = Processes.from_environment()
    kind, settings = training_method(section)
    bundle = load_bundle(spec, base_dir, processes.device)
    base_sha = weights_sha(base_dir) if base_dir is not None else None
    prompt_digest = hashlib.sha256("\n".join(p.text for p in pool.prompts).encode()).hexdigest()
    lora = lora_settings(spec, settings)
    trainer = REWARD_TRAINERS[kind](spec, bundle, settings, pool, lora, processes)
    run_training(trainer, spec=spec, phase=phase, out=out, sub_spec=sub_spec,
                 inputs={"base_sha256": base_sha, "prompts": prompt_digest},
                 provenance={**extra, "base_dir": None if base_dir is None else str(base_dir), "base_sha256": base_sha},
                 started=started, start=start, curve_path=curve_path, progress=progress)


def stage_main(phase: str, argv: list[str] | None = None) -> None:
    """Command line of stages/teacher.py and stages/baseline.py (FLOWOPD_PROCESSES=N: N processes)."""
    from flowopd.phases import check_stage_key
    from flowopd.spec import load_spec_or_exit

    if argv is None:
        relaunch_if_asked()

    parser = argparse.ArgumentParser(prog=f"stages/{phase}.py", description=f"run the {phase} phase of a spec")
    parser.add_argument("--spec", required=True, type=Path, help="spec YAML file")
    if phase == "teacher":
        parser.add_argument("--teacher", required=True, help="teacher name (a key of the spec's `teachers`)")
    parser.add_argument("--base", type=Path, help="base model artifact folder (tiny specs)")
    parser.add_argument("--data", required=True, type=Path, help="prompt sets folder (data phase)")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    parser.add_argument("--curve", type=Path, help="also write the training curve here (DVC plots)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    spec = load_spec_or_exit(args.spec)
    check_stage_key(spec, args.spec, phase, args.out, getattr(args, "teacher", None))
    if phase == "teacher":
        if args.teacher not in spec.teachers:
            raise SystemExit(f"unknown teacher {args.teacher!r}; the spec has {', '.join(spec.teachers)}")
        run_teacher(spec, args.teacher, args.base, args.data, args.out, args.curve, not args.no_progress)
    elif phase == "baseline":
        run_baseline(spec, args.base, args.data, args.out, args.curve, not args.no_progress)
    else:
        raise SystemExit(f"unknown phase {phase!r}")

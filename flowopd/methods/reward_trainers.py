"""Reward trainers by kind (REWARD_TRAINERS: grpo, nft), and the run of one on a pool of prompts and rewards.

A teacher (one task's reward) and the mixed-reward baseline (every task's) hand a `RewardPool` to the trainer their
spec section's `method.kind` names; `run_reward_phase` loads the starting model, builds that trainer and lets
flowopd.train.trainer run it and write the artifact. A new reward trainer is a class of the trainer skeleton
(flowopd.train.trainer.Trainer), an entry here and a spec section (flowopd.spec.training); docs/extending.md.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowopd.methods.grpo import GRPOTrainer
from flowopd.models.bundle import embed_and_release
from flowopd.models.loading import load_bundle, weights_sha
from flowopd.runtime.artifacts import now
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import Meter
from flowopd.train.rollouts import rollout_texts
from flowopd.train.trainer import lora_settings, run_training


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
    # On CPU the tiny model's velocities of a sub-batch match those of the whole batch, so training on the kept
    # groups only changes nothing but the time; SD3 on GPU keeps the sampling batch (docs/method.md#teachers-flow-grpo).
    return GRPOTrainer(bundle, settings, pool.prompts, pool.prompt_tasks, pool.rewards, pool.names, pool.weights,
                       advantage=pool.advantage, seed=spec.seed, lora=lora, kept_rows_only=spec.model.kind == "tiny",
                       processes=processes)


def nft_trainer(spec, bundle, settings, pool: RewardPool, lora, processes: Processes):
    from flowopd.methods.nft import NFTTrainer

    return NFTTrainer(bundle, settings, pool.prompts, pool.prompt_tasks, pool.rewards, pool.names, pool.weights,
                      advantage=pool.advantage, seed=spec.seed, lora=lora, processes=processes)


# method.kind (flowopd.spec.choices.TEACHER_METHODS) -> make(spec, bundle, settings, pool, lora, processes)
REWARD_TRAINERS = {"grpo": grpo_trainer, "nft": nft_trainer}


def run_reward_phase(spec, phase: str, sub_spec: dict, method, base_dir: Path | None, out: Path,
                     curve_path: Path | None, progress: bool, pool: RewardPool, provenance: dict) -> None:
    """Train `method` (a teacher's or the baseline's `method` section) on `pool` from the starting model and write
    the artifact `out` atomically (weights, curve, provenance and budget; resumes from `<out>.ckpt`)."""
    started, start, meter = now(), time.time(), Meter()
    processes = Processes.from_environment()
    bundle = load_bundle(spec, base_dir, processes.device)
    texts = rollout_texts(pool.prompts, method.prompts_per_step, method.group_size, method.steps, spec.seed, processes)
    embed_and_release(bundle, texts, method.micro_batch)  # sd3: every prompt this process samples, once
    base_sha = weights_sha(base_dir) if base_dir is not None else None
    prompt_digest = hashlib.sha256("\n".join(p.text for p in pool.prompts).encode()).hexdigest()
    lora = lora_settings(spec, method)
    trainer = REWARD_TRAINERS[method.kind](spec, bundle, method, pool, lora, processes)
    run_training(trainer, spec=spec, phase=phase, out=out, sub_spec=sub_spec,
                 inputs={"base_sha256": base_sha, "prompts": prompt_digest},
                 provenance={**provenance, "base_dir": None if base_dir is None else str(base_dir),
                             "base_sha256": base_sha},
                 started=started, start=start, curve_path=curve_path, progress=progress, meter=meter,
                 parents=[base_dir])

"""Where one GRPO step's time goes on the tiny model: rollout / reward / train, with the shipped spec's settings.

Run:  .venv/bin/python benchmarks/bench_grpo.py --spec specs/flow_opd.yaml --teacher quality --steps 2 [--base DIR]

Without --base the model is the spec's tiny architecture, randomly initialised (same cost per step as a trained base;
the rewards see noise, so the reward share and the share of dropped zero-variance groups differ from a real run).
One untimed warm-up step, then --steps timed steps. Prints, per step and in median: seconds of each part, images/s
of the whole step and of the rollout alone, and how much of the train part the frozen reference's forwards take.
Single process, torch's thread count (OMP_NUM_THREADS) as given.
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flowopd.methods.grpo import GRPOTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.rewards import get_reward
from flowopd.spec import load_spec
from flowopd.train.trainer import lora_settings
from flowopd.world.prompt_sets import build_prompt_sets, world_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/flow_opd.yaml"))
    parser.add_argument("--teacher", default="quality", help="quality: a graded reward, so a random base trains too")
    parser.add_argument("--base", type=Path, help="base model folder (TinyBundle.load); default: random init")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    teacher = spec.teachers[args.teacher]
    settings, sampler = teacher.method, teacher.method.sampler
    if args.base is not None:
        bundle = TinyBundle.load(args.base)
    else:
        torch.manual_seed(spec.seed)
        bundle = TinyBundle(tiny_model_config(spec)).eval()
    prompts = build_prompt_sets(spec)[teacher.task]["train"]
    reward = get_reward(spec.tasks[teacher.task].reward, world_config(spec))
    trainer = GRPOTrainer(bundle, settings, prompts, np.zeros(len(prompts), dtype=int), [reward], [teacher.task],
                          [1.0], seed=spec.seed, lora=lora_settings(spec, settings))
    images = settings.prompts_per_step * settings.group_size
    print(f"spec {spec.name}, teacher {args.teacher}: {bundle.parameter_count() / 1e6:.2f} M parameters, "
          f"{settings.prompts_per_step} prompts x {settings.group_size} = {images} images per step, "
          f"{sampler.steps} sampler steps (cfg {sampler.cfg}, cfg_train {settings.cfg_train}), "
          f"{settings.inner_epochs} inner epoch(s), beta {settings.beta}, torch threads {torch.get_num_threads()}")
    trainer.step(0)  # warm-up
    rows = []
    for step in range(1, args.steps + 1):
        row = trainer.step(step)
        rollout = trainer.rollout(step)  # the same rollout again, to time the reference's share of training
        start = time.perf_counter()
        if trainer.reference is not None:
            traj, cfg = rollout.trajectory, sampler.cfg if settings.cfg_train else 1.0
            for t in range(traj.steps - 1):
                trainer.reference.velocity(traj.latents[t], traj.sigmas[t].item(), rollout.cond, cfg)
        row["reference_s"] = time.perf_counter() - start
        rows.append(row)
        total = row["rollout_s"] + row["reward_s"] + row["train_s"]
        print(f"step {step}: rollout {row['rollout_s']:.2f} s, reward {row['reward_s']:.2f} s, train "
              f"{row['train_s']:.2f} s (reference forwards {row['reference_s']:.2f} s), total {total:.2f} s, "
              f"{images / total:.2f} images/s, kept groups {row['kept_groups']:.2f}")
    median = {key: statistics.median(r[key] for r in rows) for key in ("rollout_s", "reward_s", "train_s",
                                                                          "reference_s")}
    total = median["rollout_s"] + median["reward_s"] + median["train_s"]
    print(f"median over {len(rows)} steps: {total:.2f} s per step = {images / total:.2f} images/s "
          f"(rollout alone {images / median['rollout_s']:.1f} images/s)")
    print("split: " + ", ".join(f"{key[:-2]} {median[key] / total:.0%}" for key in ("rollout_s", "reward_s", "train_s"))
          + f"; reference forwards are {median['reference_s'] / median['train_s']:.0%} of train")
    print(f"projected: {settings.steps} steps = {settings.steps * total / 60:.1f} min per teacher")


if __name__ == "__main__":
    main()

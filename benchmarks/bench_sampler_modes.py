"""Do the stochastic samplers draw what the evaluation's ODE draws? One model, the same initial noise per sampler.

Run:  .venv/bin/python benchmarks/bench_sampler_modes.py --base artifacts/base/<key> [--n 64] [--seeds 4]

For each task's first --n test prompts and --seeds seeds, samples with the ODE (noise_level 0), the flow SDE (a 0.7),
CPS (eta 0.7), and CPS only in the windows [0, 4) and [4, 10) of the spec's 10 steps, all at the evaluation's cfg and
from the same initial noise (flowopd.flow.sampler.sample draws it first from the seeded generator). Prints each
sampler's headline score, its share of "good" samples (headline >= 0.5) and how often a sample is on the same side
of 0.5 as the ODE sample from the same noise: a teacher trained on a sampler's rollouts is trained on those images,
and evaluated on the ODE's.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from flowopd.flow.sampler import sample
from flowopd.models.tiny import TinyBundle
from flowopd.rewards import task_reward
from flowopd.spec import load_spec
from flowopd.world.prompt_sets import build_prompt_sets, world_config

SAMPLERS = {
    "ode": {"noise_level": 0.0},
    "flow SDE a=0.7": {"noise_level": 0.7},
    "CPS eta=0.7": {"noise_level": 0.7, "sde": "cps"},
    "CPS window [0,4)": {"noise_level": 0.7, "sde": "cps", "window": (0, 4)},
    "CPS window [4,10)": {"noise_level": 0.7, "sde": "cps", "window": (4, 10)},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/flow_opd.yaml"))
    parser.add_argument("--base", type=Path, required=True, help="a TinyBundle folder (the base or any teacher)")
    parser.add_argument("--n", type=int, default=64, help="test prompts per task")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    bundle, sets, ev = TinyBundle.load(args.base), build_prompt_sets(spec), spec.evaluation.sampler
    print("task | sampler | score | good share | same side of 0.5 as the ODE")
    for task_name, task in spec.tasks.items():
        prompts = sets[task_name]["test"][: args.n]
        reward, cond = task_reward(task, world_config(spec)), bundle.encode([p.text for p in prompts])
        scores = {}
        for name, options in SAMPLERS.items():
            per_seed = []
            for seed in range(args.seeds):
                x = sample(bundle, cond, steps=ev.steps, shift=ev.shift, cfg=ev.cfg,
                           generator=torch.Generator().manual_seed(seed), **options)
                per_seed.append(np.asarray(reward(bundle.decode(x), prompts)[task.metric]))
            scores[name] = np.concatenate(per_seed)
        for name, score in scores.items():
            same = np.mean((score >= 0.5) == (scores["ode"] >= 0.5))
            print(f"{task_name} | {name} | {score.mean():.3f} | {np.mean(score >= 0.5):.3f} | {same:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Every tiny-world reward on the adversarial cases of its task (flowopd/rewards/adversarial.py).

Run:  .venv/bin/python benchmarks/bench_adversarial.py --n 64 [--world spec|default]

Prints a Markdown table: per reward and case, the mean and max of `score` (what trainers optimise) over n test
prompts, the mean of the all-or-nothing metric (ocr `exact`, objects `strict`: the objects benchmark's headline),
and the margin = the ground-truth render's mean score - the case's. `--world spec` is the world of
specs/flow_opd.yaml.
"""

import argparse

import numpy as np

from flowopd.rewards import get_reward
from flowopd.rewards.adversarial import adversarial_cases
from flowopd.world import WorldConfig, make_prompt_set

TASK_OF = {"ocr": "text", "objects": "objects", "quality": "quality"}
STRICT = {"ocr": "exact", "objects": "strict"}
SPEC_WORLD = WorldConfig(colours=("red", "green", "blue"), max_count=2, jitter=False)  # specs/flow_opd.yaml


def table(world: WorldConfig, n: int, seed: int) -> list[tuple]:
    """(reward, case, mean score, max score, mean strict / exact or None, margin) rows; ground truth first."""
    rows = []
    for name, task in TASK_OF.items():
        prompts = make_prompt_set(world, task, n, seed, "test")
        reward = get_reward(name, world)
        truth = None
        for case, images in adversarial_cases(world, prompts, np.random.default_rng(seed)).items():
            out = reward(images, prompts)
            score, strict = out["score"], out.get(STRICT.get(name))
            truth = score.mean() if truth is None else truth
            rows.append((name, case, float(score.mean()), float(score.max()),
                         None if strict is None else float(strict.mean()), float(truth - score.mean())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="test prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", choices=("spec", "default"), default="spec")
    args = parser.parse_args()
    world = SPEC_WORLD if args.world == "spec" else WorldConfig()
    print("| reward | case | score mean | score max | strict / exact | margin to ground truth |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, case, mean, best, strict, margin in table(world, args.n, args.seed):
        strict = "-" if strict is None else f"{strict:.3f}"
        print(f"| {name} | {case} | {mean:.3f} | {best:.3f} | {strict} | {margin:.3f} |")


if __name__ == "__main__":
    main()

"""Does this world's base learn its skills, and on held-out content? Train a spec's base, score it per split.

Run:  .venv/bin/python benchmarks/bench_base.py SPEC OUT [--n 64] [--seeds 0,1]

Writes the spec's prompt sets (the data phase) and base (the base phase) into OUT (kept: a second run only scores),
then samples the base on the first --n prompts of each task's validation and training split with the spec's
evaluation sampler, once per seed, and prints the task metric's mean per (task, split). The bad modes make about
half of a base's samples wrong, so about 0.5 is the most a base scores. docs/tiny-world.md#a-world-for-held-out-content
holds the worlds this compared.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from flowopd.evaluation.benchmark import generate
from flowopd.models.bundle import sampling_transformer
from flowopd.models.loading import load_model
from flowopd.phases.base import run_base
from flowopd.phases.data import run_data
from flowopd.rewards import task_reward
from flowopd.spec import load_spec
from flowopd.world.prompt_sets import read_prompts, world_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=64, help="prompts per task and split")
    parser.add_argument("--seeds", default="0,1", help="evaluation seeds")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "data").exists():
        run_data(spec, args.out / "data")
    start = time.time()
    if not (args.out / "base").exists():
        run_base(spec, args.out / "base", progress=False)
        print(f"base trained in {time.time() - start:.1f} s")
    bundle = load_model(spec, args.out / "base")
    transformer = sampling_transformer(bundle, spec.evaluation.dtype)
    scores = {}
    for task, settings in spec.tasks.items():
        reward = task_reward(settings, world_config(spec))
        for split in ("val", "train"):
            prompts = read_prompts(args.out / "data", task, split)[: args.n]
            per_seed = [np.mean(reward(generate(bundle, prompts, spec.evaluation.sampler, int(seed), 64,
                                                transformer=transformer), prompts)[settings.metric])
                        for seed in args.seeds.split(",")]
            scores[f"{task}.{split}"] = round(float(np.mean(per_seed)), 3)
            print(f"{task:10s} {split:5s} {scores[f'{task}.{split}']:.3f}  ({len(prompts)} prompts)")
    (args.out / "scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()

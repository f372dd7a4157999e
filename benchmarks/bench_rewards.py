"""Throughput of each reward on ground-truth renders of the tiny world.

Run:  .venv/bin/python benchmarks/bench_rewards.py --n 512 --repeats 3

Prints, per reward, images per second (median and best of the timed repeats, after one untimed warm-up call on a
few images) and the mean score of the timed batch. Single process, whatever threads numpy uses.
"""

import argparse
import statistics
import time

import numpy as np

from flowopd.rewards import get_reward
from flowopd.world import WorldConfig, make_prompt_set, render, sample_prompts

PROMPTS_FOR = {"ocr": "text", "objects": "objects", "quality": "quality"}  # the prompts each reward trains on


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    world = WorldConfig()
    for name, task in PROMPTS_FOR.items():
        rng = np.random.default_rng(args.seed)
        if task:
            prompts = make_prompt_set(world, task, args.n, args.seed, "test")
        else:
            prompts = sample_prompts(world, rng, args.n)
        images = np.stack([render(world, p, rng) for p in prompts])
        reward = get_reward(name, world)
        reward(images[:8], prompts[:8])  # warm-up: loads Tesseract once per process
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = reward(images, prompts)
            rates.append(args.n / (time.perf_counter() - start))
        print(f"{name:8s} n={args.n} images/s median {statistics.median(rates):7.0f} best {max(rates):7.0f}"
              f"  mean score {out['score'].mean():.3f}")


if __name__ == "__main__":
    main()

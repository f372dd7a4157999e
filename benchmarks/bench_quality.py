"""The prompt-aware quality reward on ground-truth renders, graded flaws and wrong content.

Run:  .venv/bin/python benchmarks/bench_quality.py --n 96 [--world spec|default]

Prints, per case, the mean (and min / max) of score = content x finish and of its two factors over n quality
prompts of the train split: clean renders; Gaussian pixel noise of growing std; Gaussian blur of growing radius;
the flaws the base's training pairs carry (flowopd.world.degrade); the render of a wrong colour or shape.
"""

import argparse

import numpy as np
from PIL import Image, ImageFilter

from flowopd.rewards import get_reward
from flowopd.world import WorldConfig, corrupt_prompt, degrade, make_prompt_set, quality_prompt, render

SPEC_WORLD = WorldConfig(colours=("red", "green", "blue"), max_count=2, jitter=False)  # specs/flow_opd.yaml


def cases(world: WorldConfig, prompts, truth: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {"clean": truth}
    for std in (10, 20, 40, 60):
        out[f"noise std {std}"] = np.clip(truth + rng.normal(0, std, truth.shape), 0, 255).astype(np.uint8)
    for radius in (0.5, 1.0, 1.5, 2.5):
        out[f"blur radius {radius}"] = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius)))
                                                 for x in truth])
    for kind in ("noise", "blur"):
        out[f"degrade {kind}"] = np.stack([degrade(x, rng, kind) for x in truth])
    out["wrong colour"] = np.stack([render(world, corrupt_prompt(world, p, rng, "colour"), rng) for p in prompts])
    shapes = world.shapes
    out["wrong shape"] = np.stack([render(world, quality_prompt(p.objects[0].colour, shapes[
        (shapes.index(p.objects[0].shape) + 1) % len(shapes)]), rng) for p in prompts])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", choices=("spec", "default"), default="spec")
    args = parser.parse_args()
    world = SPEC_WORLD if args.world == "spec" else WorldConfig()
    prompts = make_prompt_set(world, "quality", args.n, args.seed, "train")
    rng = np.random.default_rng(args.seed)
    truth = np.stack([render(world, p, rng) for p in prompts])
    quality = get_reward("quality", world)
    print("| case | score mean | min | max | content | finish |\n| --- | --- | --- | --- | --- | --- |")
    for name, images in cases(world, prompts, truth, rng).items():
        out = quality(images, prompts)
        s = out["score"]
        print(f"| {name} | {s.mean():.3f} | {s.min():.3f} | {s.max():.3f} | {out['content'].mean():.3f} "
              f"| {out['finish'].mean():.3f} |")


if __name__ == "__main__":
    main()

"""Cost of the prompt-ignoring detector (flowopd/evaluation/exploits.py) beside the evaluation it runs in.

Run:  .venv/bin/python benchmarks/bench_detector.py --spec specs/flow_opd.yaml [--model artifacts/base/<key>]

Per benchmark and seed, as flowopd.evaluation.benchmark runs them, times: sampling (the spec's evaluation sampler on the
model; without --model a freshly initialised tiny model of the spec, which costs the same), the reward, and the
detector given the reward's scores. The detector's cost depends on the pictures (it cross-scores only samples that
look like a sample fitting its own prompt clearly better), so it runs on three picture sets: the model's samples, a
mediocre fake (ground truth, with a wrong colour / word / count for 1 prompt in 3 and a noisy or blurred render for
1 in 10) and a collapsed fake (one of three prompts' renders for every prompt, its worst case). Prints seconds and
the detector's share of one evaluation (sampling + reward).
"""

import argparse
import time

import numpy as np
import torch

from flowopd.evaluation.benchmark import EVAL_BATCH, generate
from flowopd.evaluation.exploits import prompt_ignoring
from flowopd.rewards import task_reward
from flowopd.rewards.adversarial import render_all
from flowopd.spec import load_spec
from flowopd.world import corrupt_prompt, degrade
from flowopd.world.prompt_sets import build_prompt_sets, world_config


def fakes(world, prompts, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shown = [corrupt_prompt(world, p, rng) if i % 3 == 2 else p for i, p in enumerate(prompts)]
    mediocre = render_all(world, shown, rng)
    for i in range(0, len(prompts), 10):
        mediocre[i] = degrade(mediocre[i], rng, ("noise", "blur")[i // 10 % 2])
    collapsed = render_all(world, [prompts[i % 3] for i in range(len(prompts))], rng)
    return {"mediocre": mediocre, "collapsed": collapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/flow_opd.yaml")
    parser.add_argument("--model", help="a tiny model artifact folder (default: a fresh model of the spec)")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    if spec.model.kind != "tiny":
        raise SystemExit("this benchmark times tiny specs")
    from flowopd.methods.pretrain import tiny_model_config
    from flowopd.models.tiny import TinyBundle

    torch.manual_seed(0)
    bundle = TinyBundle.load(args.model) if args.model else TinyBundle(tiny_model_config(spec)).eval()
    world, evaluation = world_config(spec), spec.evaluation
    sets = build_prompt_sets(spec)
    seconds = {"sampling": 0.0, "reward": 0.0, "detector: model": 0.0, "detector: mediocre": 0.0,
               "detector: collapsed": 0.0}
    shares = {k: [] for k in seconds if k.startswith("detector")}
    for name in evaluation.benchmarks:
        task = spec.tasks[name]
        prompts = sets[name]["test"][: evaluation.n_prompts]
        reward = task_reward(task, world)
        for seed in evaluation.seeds:
            start = time.perf_counter()
            images = generate(bundle, prompts, evaluation.sampler, seed, EVAL_BATCH["tiny"])
            seconds["sampling"] += time.perf_counter() - start
            for label, pictures in {"model": images, **fakes(world, prompts, seed)}.items():
                start = time.perf_counter()
                scores = reward(pictures, prompts)["score"]
                if label == "model":
                    seconds["reward"] += time.perf_counter() - start
                start = time.perf_counter()
                flags = prompt_ignoring(pictures, prompts, reward, scores, task.normaliser)
                seconds[f"detector: {label}"] += time.perf_counter() - start
                shares[f"detector: {label}"].append(flags.mean())
    evaluation_seconds = seconds["sampling"] + seconds["reward"]
    print(f"one evaluation ({len(evaluation.benchmarks)} benchmarks x {len(evaluation.seeds)} seeds): sampling "
          f"{seconds['sampling']:.2f} s, reward {seconds['reward']:.2f} s")
    for key, share in shares.items():
        print(f"{key:20s} {seconds[key]:6.2f} s = {100 * seconds[key] / evaluation_seconds:5.1f} % of the evaluation; "
              f"flagged share {np.mean(share):.3f}")


if __name__ == "__main__":
    main()

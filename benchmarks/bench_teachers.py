"""Which teacher trainer should I use? Each method on each task for the same CPU seconds, from the same base.

Run:  .venv/bin/python benchmarks/bench_teachers.py --base artifacts/base/<key> [--seconds 120] [--tasks text,objects]
      [--methods spec,grpo_flow,grpo_cps,grpo_window,nft] [--spec specs/flow_opd.yaml] [--n 64] [--seeds 0,1]

A method is a teacher `method` section: `spec` is the spec's own teacher of the task; the others are the spec's
teacher settings with the named variant's keys changed (VARIANTS below; the sampler keeps the spec's steps, shift
and cfg). Each run trains a fresh copy of the base until its process has used --seconds of CPU time
(time.process_time, every thread counted, so a busy machine slows the run but does not shorten its budget), then
evaluates the EMA weights on the task's held-out prompts with the spec's evaluation sampler.

Prints one row per (task, method): steps and images trained, the base's and the teacher's held-out headline score,
the gain and the gain per CPU minute, the training reward's first and last tenth (means), and `collapse`: the
held-out score fell more than 0.1 below the base's, or more than half of the samples are flagged by
flowopd.evaluation.exploits as ignoring their prompt.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from flowopd.evaluation.benchmark import generate
from flowopd.evaluation.exploits import prompt_ignoring
from flowopd.methods.reward_trainers import REWARD_TRAINERS, RewardPool
from flowopd.models.tiny import TinyBundle
from flowopd.rewards import task_reward
from flowopd.runtime.processes import Processes
from flowopd.spec import deep_merge, load_spec, validate_spec
from flowopd.world.prompt_sets import build_prompt_sets, world_config

GRPO = {"kind": "grpo", "clip_eps": 1.0e-4, "beta": 0.04, "adv_clip": 5.0, "timestep_fraction": 0.5}
VARIANTS = {  # name -> the teacher method's keys that differ from the spec's teacher
    "grpo_flow": GRPO | {"sampler": {"sde": "flow", "noise_level": 0.7}},
    "grpo_cps": GRPO | {"sampler": {"sde": "cps", "noise_level": 0.7}},
    "grpo_window": GRPO | {"timestep_fraction": 1.0, "sampler": {"sde": "cps", "noise_level": 0.7,
                                                                 "sde_window": [0, 4]}},
    "nft": {"kind": "nft"},
}
COLLAPSE_DROP, COLLAPSE_IGNORING = 0.1, 0.5


def method_spec(spec, task_name: str, variant: str):
    """The spec with teacher `task_name`'s method replaced by the variant (validated like any spec)."""
    raw = spec.model_dump(mode="json")
    if variant == "spec":
        return spec
    own = raw["teachers"][task_name]["method"]
    keep = {k: own[k] for k in ("group_size", "prompts_per_step", "lr", "steps", "ema", "lora") if k in own}
    sampler = {k: raw["sampler"][k] for k in ("steps", "shift", "cfg")}
    method = deep_merge(keep | {"sampler": sampler}, VARIANTS[variant])
    if method["kind"] == "nft" and own.get("kind") == "nft":
        method = deep_merge(own, {"sampler": sampler})
    raw["teachers"][task_name]["method"] = method
    return validate_spec(raw)


def held_out(bundle, spec, task_name, prompts, seeds) -> tuple[float, float]:
    """(headline score, share flagged as prompt-ignoring) on the task's test prompts over seeds."""
    task, reward = spec.tasks[task_name], task_reward(spec.tasks[task_name], world_config(spec))
    scores, flags = [], []
    for seed in seeds:
        images = generate(bundle, prompts, spec.evaluation.sampler, seed)
        own = reward(images, prompts)
        scores.append(np.mean(own[task.metric]))
        flags.append(np.mean(prompt_ignoring(images, prompts, reward, own["score"], task.normaliser)))
    return float(np.mean(scores)), float(np.mean(flags))


def run(spec, base: Path, task_name: str, variant: str, seconds: float, prompts, test, seeds) -> dict:
    spec = method_spec(spec, task_name, variant)
    method = spec.teachers[task_name].method
    bundle = TinyBundle.load(base)
    pool = RewardPool(prompts, np.zeros(len(prompts), dtype=int),
                      [task_reward(spec.tasks[task_name], world_config(spec))], [task_name], [1.0])
    trainer = REWARD_TRAINERS[method.kind](spec, bundle, method, pool, None, Processes())
    start, wall, rewards, step = time.process_time(), time.perf_counter(), [], 0
    while time.process_time() - start < seconds:
        rewards.append(trainer.step(step)["reward"])
        if trainer.ema is not None:
            trainer.ema.step(trainer.params, step)
        step += 1
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    trainer.apply_ema()
    score, ignoring = held_out(bundle, spec, task_name, test, seeds)
    tenth = max(1, len(rewards) // 10)
    return {"steps": step, "images": step * method.prompts_per_step * method.group_size, "cpu_s": cpu,
            "wall_s": wall, "score": score, "ignoring": ignoring, "reward_first": np.mean(rewards[:tenth]),
            "reward_last": np.mean(rewards[-tenth:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/flow_opd.yaml"))
    parser.add_argument("--base", type=Path, required=True, help="the base model artifact (TinyBundle folder)")
    parser.add_argument("--seconds", type=float, default=120.0, help="CPU seconds per run (all threads)")
    parser.add_argument("--tasks", default="text,objects,quality")
    parser.add_argument("--methods", default="spec,grpo_flow,grpo_cps,grpo_window,nft")
    parser.add_argument("--n", type=int, default=64, help="held-out prompts per task")
    parser.add_argument("--seeds", default="0,1", help="evaluation seeds")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    sets = build_prompt_sets(spec)
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher_of = {t.task: name for name, t in spec.teachers.items()}
    print(f"{args.seconds:.0f} CPU s per run; held-out: {args.n} prompts x {len(seeds)} seeds, evaluation sampler "
          f"{spec.evaluation.sampler.steps} steps, cfg {spec.evaluation.sampler.cfg}")
    header = ("task", "method", "steps", "images", "cpu_s", "wall_s", "base", "score", "gain", "gain/cpu_min",
              "reward_first", "reward_last", "ignoring", "collapse")
    print(" | ".join(header))
    for task in args.tasks.split(","):
        test = sets[task]["test"][: args.n]
        base_score, _ = held_out(TinyBundle.load(args.base), spec, task, test, seeds)
        for variant in args.methods.split(","):
            r = run(spec, args.base, teacher_of[task], variant, args.seconds, sets[task]["train"], test, seeds)
            gain = r["score"] - base_score
            collapse = r["score"] < base_score - COLLAPSE_DROP or r["ignoring"] > COLLAPSE_IGNORING
            print(" | ".join([task, variant, str(r["steps"]), str(r["images"]), f"{r['cpu_s']:.0f}",
                              f"{r['wall_s']:.0f}", f"{base_score:.3f}", f"{r['score']:.3f}", f"{gain:+.3f}",
                              f"{gain / (r['cpu_s'] / 60):+.3f}", f"{r['reward_first']:.3f}",
                              f"{r['reward_last']:.3f}", f"{r['ignoring']:.2f}", "yes" if collapse else "no"]),
                  flush=True)


if __name__ == "__main__":
    main()

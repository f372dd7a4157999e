"""One OPD step against one GRPO step at the same batch, measured side by side in one process.

Run:  .venv/bin/python benchmarks/bench_opd.py --spec specs/flow_opd.yaml --steps 3 [--base DIR]
      [--also specs/ablations/velocity_mse.yaml ...]   (more OPD settings, e.g. other estimators, in the same loop)

Both trainers start from the same model (the base artifact, or the spec's tiny architecture randomly initialised) and
use the spec's OPD batch, sampler, timestep fraction and CFG; GRPO trains on the quality reward with the text
teacher's other settings (beta > 0: one frozen-reference forward per trained step). OPD's teachers are frozen copies
of that model, one per routed teacher, and the MAR anchor is the quality teacher, as in the main spec. Steps
alternate (GRPO k, OPD k, then each --also spec's OPD k) after one untimed warm-up step each, so all see the same
machine load. Prints the median step time of each, their ratio, and OPD's split into rollout / teacher forwards /
train.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flowopd.methods.grpo import GRPOTrainer
from flowopd.methods.opd_trainer import OPDTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.methods.router import Router
from flowopd.models.tiny import TinyBundle
from flowopd.rewards import get_reward
from flowopd.spec import load_spec
from flowopd.world.prompt_sets import build_prompt_sets, world_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/flow_opd.yaml"))
    parser.add_argument("--base", type=Path, help="base model folder (TinyBundle.load); default: random init")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each trainer after one warm-up step")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="specs whose OPD settings to time too")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    if args.base is not None:
        model = TinyBundle.load(args.base)
    else:
        torch.manual_seed(spec.seed)
        model = TinyBundle(tiny_model_config(spec)).eval()
    opd = spec.opd
    shared = {k: getattr(opd, k) for k in ("group_size", "prompts_per_step", "lr", "timestep_fraction", "inner_epochs",
                                          "grad_clip", "cfg_train", "sampler", "ema", "clip_eps")}
    grpo = spec.teachers["quality"].method.model_copy(update=shared)
    sets = build_prompt_sets(spec)
    prompts = [p for task in spec.tasks for p in sets[task]["train"]]
    routes = Router.from_spec(spec).route_all(prompts)

    quality = get_reward(spec.tasks["quality"].reward, world_config(spec))
    grpo_trainer = GRPOTrainer(copy.deepcopy(model), grpo, prompts, np.zeros(len(prompts), dtype=int), [quality],
                               ["quality"], [1.0], seed=spec.seed)
    teachers = {name: copy.deepcopy(model).eval() for name in sorted(set(routes))}
    anchor = teachers.get(spec.mar.anchor, model)
    trainers = {"grpo": grpo_trainer}
    for label, settings in [(spec.label, opd), *((s.label, s.opd) for s in map(load_spec, args.also))]:
        trainers[label] = OPDTrainer(copy.deepcopy(model), settings, prompts, routes, teachers, anchor,
                                     spec.mar.weight, seed=spec.seed)
    images = opd.prompts_per_step * opd.group_size
    print(f"spec {spec.name}: {model.parameter_count() / 1e6:.2f} M parameters, {images} images per step, "
          f"{opd.sampler.steps} sampler steps, timestep fraction {opd.timestep_fraction}, cfg {opd.sampler.cfg} "
          f"(train {opd.cfg_train}), estimator {opd.estimator}, MAR {spec.mar.weight}, "
          f"torch threads {torch.get_num_threads()}")
    times, splits = {name: [] for name in trainers}, {name: [] for name in trainers}
    for step in range(args.steps + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            row = trainer.step(step)
            if step:
                times[name].append(time.perf_counter() - start)
                splits[name].append(row)
    grpo_s = statistics.median(times["grpo"])
    print(f"median over {args.steps} steps: GRPO {grpo_s:.2f} s ({images / grpo_s:.2f} images/s)")
    for name in list(trainers)[1:]:
        opd_s = statistics.median(times[name])
        split = {k: statistics.median(r[k] for r in splits[name]) for k in ("rollout_s", "teacher_s", "train_s")}
        print(f"OPD {name} ({trainers[name].settings.estimator}): {opd_s:.2f} s ({images / opd_s:.2f} images/s), "
              f"{opd_s / grpo_s:.2f}x GRPO; split " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in split.items()))


if __name__ == "__main__":
    main()

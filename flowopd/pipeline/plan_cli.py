"""`flowopd spec plan SPEC --gpu-memory GB [--gpus N]`: each stage's predicted peak memory per GPU before a run
(flowopd/pipeline/memory_plan.py); exit status 1 naming every stage that does not fit and by how much."""

from __future__ import annotations

import sys

from flowopd.spec.validation import load_spec_or_exit


def cmd_plan(args) -> int:
    spec = load_spec_or_exit(args.path)  # a missing file or bad YAML is a SpecError too
    if args.gpu_memory <= 0 or args.gpus < 1:
        print("--gpu-memory must be > 0 GB and --gpus >= 1", file=sys.stderr)
        return 1
    from flowopd.evaluation.benchmark import EVAL_BATCH
    from flowopd.methods.sft import SAMPLE_BATCH
    from flowopd.pipeline.memory_plan import Planner, plan_text, shortfalls

    try:
        planner = Planner(spec, args.gpus, EVAL_BATCH["sd3"], SAMPLE_BATCH)
        print(f"measuring activations on a cut-down {spec.model.pretrained} ...", file=sys.stderr, flush=True)
        stages = planner.stages()
    except SystemExit as err:
        print(f"{args.path}: {err}", file=sys.stderr)
        return 1
    print(plan_text(planner, stages, args.gpu_memory))
    problems = shortfalls(stages, args.gpu_memory)
    for line in problems:
        print(f"{args.path}: {line}", file=sys.stderr)
    return 1 if problems else 0


def add_plan_parser(spec_subparsers) -> None:
    """Register `plan` among the `flowopd spec` commands (flowopd.spec.spec_cli.add_spec_parser's `extra`)."""
    p = spec_subparsers.add_parser("plan", help="predict each stage's peak memory per GPU (sd3 specs)")
    p.add_argument("path", metavar="SPEC")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory of one GPU (1 GB = 1e9 B)")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="processes (one GPU each) splitting each step")
    p.set_defaults(func=cmd_plan)


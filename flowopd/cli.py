"""`flowopd ...` and `python -m flowopd ...`: one subcommand per job.

Heavy imports (torch, diffusers) stay inside the subcommands that need them."""

from __future__ import annotations

import argparse

from flowopd.pipeline.experiment import add_experiment_parser
from flowopd.pipeline.pipeline_cli import add_pipeline_parser
from flowopd.pipeline.plan_cli import add_plan_parser
from flowopd.results.ledger_cli import add_ledger_parser
from flowopd.results.report_cli import add_report_parser
from flowopd.rewards.serve_cli import add_serve_parser
from flowopd.spec.spec_cli import add_spec_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowopd", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_spec_parser(subparsers, extra=(add_plan_parser,))
    add_pipeline_parser(subparsers)
    add_ledger_parser(subparsers)
    add_report_parser(subparsers)
    add_experiment_parser(subparsers)
    add_serve_parser(subparsers)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only `exp run` passes arguments on (to `dvc exp run`)
        if not hasattr(args, "dvc_args"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.dvc_args = unknown
    return args.func(args)

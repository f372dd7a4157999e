"""`flowopd ...` and `python -m flowopd ...`: one subcommand per job.

Heavy imports (torch, diffusers) stay inside the subcommands that need them."""

from __future__ import annotations

import argparse
import sys

from flowopd.experiment import add_experiment_parser
from flowopd.ledger import add_ledger_parser
from flowopd.report import add_report_parser
from flowopd.spec_cli import add_spec_parser


def pipeline_command(args) -> int:
    from flowopd import pipeline
    from flowopd.spec import SpecError

    try:
        if args.action == "write":
            changed = pipeline.write()
            print(f"{', '.join(changed)} updated" if changed else "dvc.yaml files already up to date")
            return 0
        if pipeline.stale():
            print("a dvc.yaml is stale: specs/ changed since it was written; run `flowopd pipeline write`")
            return 1
        print("dvc.yaml and sd3/dvc.yaml are up to date with specs/")
        return 0
    except SpecError as error:
        print(error, file=sys.stderr)
        return 1


def add_pipeline_parser(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="generate or check dvc.yaml and sd3/dvc.yaml from the spec files")
    parser.add_argument("action", choices=["write", "check"])
    parser.set_defaults(func=pipeline_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowopd", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_spec_parser(subparsers)
    add_pipeline_parser(subparsers)
    add_ledger_parser(subparsers)
    add_report_parser(subparsers)
    add_experiment_parser(subparsers)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only `exp run` passes arguments on (to `dvc exp run`)
        if not hasattr(args, "dvc_args"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.dvc_args = unknown
    return args.func(args)

"""`flowopd pipeline write|check`: generate dvc.yaml and sd3/dvc.yaml from the spec files, or check they are current."""

from __future__ import annotations

import sys


def pipeline_command(args) -> int:
    from flowopd.pipeline import dvc as pipeline
    from flowopd.spec import SpecError

    try:
        if args.action == "write":
            notes = []
            changed = pipeline.write(notes=notes)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
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

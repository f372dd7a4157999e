"""`flowopd spec validate|show|hash|schema`: check, print and hash experiment specs (`plan`, which needs the models,
is added by flowopd.cli from flowopd/pipeline/plan_cli.py).

Bad input never gives a traceback: each problem is one line on its own, and the exit status is 1.
Imports nothing heavy (no torch, no diffusers), so it answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from flowopd.spec.errors import SpecError
from flowopd.spec.hashing import spec_hash
from flowopd.spec.schema import json_schema
from flowopd.spec.validation import load_spec

SCHEMA_PATH = "specs/schema.json"


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def _load(path: str):
    """The validated spec, or None after printing its problems to stderr."""
    try:
        return load_spec(path)
    except SpecError as err:
        print(err, file=sys.stderr)
    except (OSError, yaml.YAMLError) as err:
        print(f"{path}: {err}", file=sys.stderr)
    return None


def cmd_validate(args) -> int:
    failed = 0
    for path in args.paths:
        try:
            print(f"ok {path} {spec_hash(load_spec(path))[:12]}")
        except SpecError as err:
            print(err)
            failed += 1
        except (OSError, yaml.YAMLError) as err:
            print(f"{path}: {err}")
            failed += 1
    return 1 if failed else 0


def cmd_show(args) -> int:
    spec = _load(args.path)
    if spec is None:
        return 1
    print(f"# {args.path} resolved; spec_hash {spec_hash(spec)}")
    print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_hash(args) -> int:
    spec = _load(args.path)
    if spec is None:
        return 1
    if args.section:
        try:
            print(spec.section_hash(*args.section))
        except KeyError as err:
            print(f"{args.path}: {err.args[0]}", file=sys.stderr)
            return 1
    else:
        print(spec_hash(spec))
    return 0


def cmd_schema(args) -> int:
    text = schema_text()
    if args.check:
        try:
            current = Path(args.check).read_text(encoding="utf-8")
        except OSError as err:
            current = f"{err}"
        if current != text:
            command = f"flowopd spec schema --write {args.check}"
            print(f"{args.check} is stale; regenerate: {command}", file=sys.stderr)
            return 1
        print(f"ok {args.check}")
    elif args.write:
        try:
            Path(args.write).write_text(text, encoding="utf-8")
        except OSError as err:
            print(f"{args.write}: {err.strerror or err}", file=sys.stderr)
            return 1
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


def add_spec_parser(subparsers, extra=()) -> argparse.ArgumentParser:
    """Register `spec` on a parent parser's subparsers; each leaf sets `func(args) -> exit status`. `extra`: functions
    adding more leaves to `spec` from layers above this one (e.g. `plan`)."""
    parser = subparsers.add_parser("spec", help="validate, show, hash experiment specs; print their schema")
    sub = parser.add_subparsers(dest="spec_command", required=True)
    p = sub.add_parser("validate", help="check specs: 'ok PATH HASH12' each, or one line per problem")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("show", help="print the resolved spec (extends merged, defaults filled) as YAML")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("hash", help="print the spec's sha256 (or the hash of some top-level sections)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--section", action="append", metavar="NAME", help="hash only these sections (repeatable)")
    p.set_defaults(func=cmd_hash)
    p = sub.add_parser("schema", help="print the spec's JSON schema")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help=f"write it to FILE (e.g. {SCHEMA_PATH})")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the current schema")
    p.set_defaults(func=cmd_schema)
    for add in extra:
        add(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return parser


def main_spec(argv: list[str] | None = None) -> int:
    """Standalone entry: `main_spec(["validate", "specs/flow_opd.yaml"])`."""
    parser = argparse.ArgumentParser(prog="flowopd")
    add_spec_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["spec", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main_spec())

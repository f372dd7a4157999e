"""`flowopd exp run -S FILE:KEY=VALUE ...`: a DVC experiment whose stage keys say what made it.

`dvc exp run -S` edits a spec after dvc.yaml was written: the stages keep the committed keys, so their folders would be
named for other settings (the stages refuse, flowopd.phases.keys.check_stage_key). This command makes the same edits to
the spec files (YAML round trip: comments, anchors and layout kept), regenerates dvc.yaml so each changed stage gets
its new key, then runs `dvc exp run` with the remaining arguments (`-n NAME`, targets, `--queue`, ...). The
experiment's commit holds the edited specs and dvc.yaml, and its runs are recorded as dirty (specs differ from the
commit they started from). A value is read as YAML: `3`, `1.0e-4`, `[0, 1]`, `{steps: 4}`, `null`, `text`.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import yaml


class ExperimentError(Exception):
    """A bad assignment or an edit that leaves a spec invalid (nothing is written then)."""


def parse_assignment(text: str) -> tuple[str, list[str], object]:
    """'specs/x.yaml:evaluation.seeds=[0]' -> ('specs/x.yaml', ['evaluation', 'seeds'], [0])."""
    from flowopd.spec.extends import StrictLoader

    target, sep, value = text.partition("=")
    file, colon, dotted = target.rpartition(":")
    if not sep or not colon or not file or not dotted or "" in dotted.split("."):
        raise ExperimentError(f"-S {text}: expected FILE:KEY=VALUE, e.g. specs/flow_opd.yaml:evaluation.seeds=[0]")
    try:
        parsed = yaml.load(value, Loader=StrictLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise ExperimentError(f"-S {text}: the value is not YAML ({err})") from None
    return file, dotted.split("."), parsed


def _round_trip():
    from ruamel.yaml import YAML

    loader = YAML()  # round trip: comments, anchors and merge keys kept
    loader.preserve_quotes = True
    loader.width = 1 << 16
    loader.indent(mapping=2, sequence=4, offset=2)
    loader.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return loader


def _flow(value):
    """New lists and mappings in flow style ([0, 1], {steps: 4}), as the shipped specs write them."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        seq = CommentedSeq([_flow(v) for v in value])
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap({k: _flow(v) for k, v in value.items()})
        mapping.fa.set_flow_style()
        return mapping
    return value


def set_value(text: str, keys: list[str], value, where: str) -> str:
    """The YAML `text` with `keys` (a dotted path; missing mappings created) set to `value`."""
    loader = _round_trip()
    data = loader.load(text)
    node = data
    for depth, key in enumerate(keys[:-1]):
        if key not in node:
            node[key] = _flow({})
            node[key].fa.set_block_style()
        node = node[key]
        if not isinstance(node, dict):
            raise ExperimentError(f"{where}: {'.'.join(keys[: depth + 1])} is not a mapping: set it whole")
    if not isinstance(node, dict):
        raise ExperimentError(f"{where}: not a mapping")
    node[keys[-1]] = _flow(value)
    out = io.StringIO()
    loader.dump(data, out)
    return out.getvalue()


def apply(assignments: list[str], root: Path = Path(".")) -> list[Path]:
    """Edit the spec files and rewrite dvc.yaml; all or nothing (a bad edit restores every file). Returns the files."""
    from flowopd.pipeline import dvc as pipeline
    from flowopd.spec import SpecError

    edits = [parse_assignment(a) for a in assignments]
    originals: dict[Path, str] = {}
    try:
        for file, keys, value in edits:
            path = Path(root) / file
            if not path.is_file():
                raise ExperimentError(f"-S {file}: no such spec file")
            text = path.read_text(encoding="utf-8")
            originals.setdefault(path, text)
            path.write_text(set_value(text, keys, value, file), encoding="utf-8")
        pipeline.write(root)  # validates every pipeline spec, then re-keys the stages
    except (ExperimentError, SpecError) as err:
        for path, text in originals.items():
            path.write_text(text, encoding="utf-8")
        raise ExperimentError(str(err)) from None
    return list(originals)


def run_command(args) -> int:
    try:
        edited = apply(args.set_param)
    except ExperimentError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"edited {', '.join(map(str, edited))}; dvc.yaml re-keyed; running `dvc exp run {' '.join(args.dvc_args)}`")
    # stage commands call `python`: this environment's, whatever the caller's PATH says (as `make repro` does)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dvc", "exp", "run", *args.dvc_args], env=env, check=False).returncode


def add_experiment_parser(subparsers) -> None:
    parser = subparsers.add_parser("exp", help="DVC experiments with honest stage keys (`flowopd exp run -S ...`)")
    sub = parser.add_subparsers(dest="exp_command", required=True, metavar="{run}")
    p = sub.add_parser("run", help="edit spec fields, re-key dvc.yaml, run `dvc exp run` with the other arguments",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-S", "--set-param", action="append", required=True, metavar="FILE:KEY=VALUE",
                   help="a spec field to set, e.g. specs/flow_opd.yaml:evaluation.seeds=[0] (repeatable)")
    p.set_defaults(func=run_command, dvc_args=[])

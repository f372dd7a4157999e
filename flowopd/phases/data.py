"""Phase `data`: each task's prompt sets (train, validation, test), drawn from the tiny world or read from files;
the record counts each tiny task's distinct contents per split, checked disjoint across splits and tasks.

    python stages/data.py --spec SPEC --out DIR
"""

from __future__ import annotations

import time
from pathlib import Path

from flowopd.phases.keys import sub_spec
from flowopd.phases.stage_cli import load_checked_spec, stage_parser
from flowopd.runtime.artifacts import atomic_folder, now, spec_identity, write_provenance
from flowopd.runtime.launch import refuse_several_processes


def run_data(spec, out: Path) -> None:
    from flowopd.world.prompt_sets import build_prompt_sets, content_census, write_prompt_sets

    started, start = now(), time.time()
    with atomic_folder(out) as folder:
        sets = build_prompt_sets(spec)
        write_prompt_sets(sets, folder)
        counts = {task: {split: len(p) for split, p in splits.items()} for task, splits in sets.items()}
        write_provenance(folder, "data", sub_spec(spec, "data"), **spec_identity(spec), prompt_counts=counts,
                         distinct_contents=content_census(spec, sets),
                         started=started, finished=now(), seconds=round(time.time() - start, 2))


def main(argv: list[str] | None = None) -> None:
    refuse_several_processes("data")
    args = stage_parser("data").parse_args(argv)
    run_data(load_checked_spec(args, "data"), args.out)

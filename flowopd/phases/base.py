"""Phase `base` (tiny world only): pretrain the base model by flow matching on the world's renders.

    python stages/base.py --spec SPEC --out DIR [--curve CSV]
"""

from __future__ import annotations

import time
from pathlib import Path

from flowopd.phases.keys import sub_spec
from flowopd.phases.stage_cli import add_curve, load_checked_spec, stage_parser
from flowopd.runtime.artifacts import (
    atomic_folder,
    now,
    sha256_file,
    spec_identity,
    write_curve,
    write_provenance,
)
from flowopd.runtime.launch import refuse_several_processes


def run_base(spec, out: Path, curve_path: Path | None = None, progress: bool = True) -> None:
    if spec.model.kind != "tiny":
        raise SystemExit("the base phase pretrains tiny models only; an sd3 spec starts from its pretrained weights")
    started, start = now(), time.time()  # like every phase's clock, it covers the model library's import
    from flowopd.methods.pretrain import pretrain

    bundle, curve = pretrain(spec, progress=progress)
    with atomic_folder(out) as folder:
        bundle.save(folder)
        write_curve(folder / "curve.csv", curve)
        write_provenance(
            folder,
            "base",
            sub_spec(spec, "base"),
            **spec_identity(spec),
            curve=curve,
            parameters=bundle.parameter_count(),
            started=started,
            finished=now(),
            seconds=round(time.time() - start, 2),
            weights_sha256=sha256_file(folder / "model.safetensors"),
        )
    if curve_path is not None:
        write_curve(curve_path, curve)


def main(argv: list[str] | None = None) -> None:
    refuse_several_processes("base")
    parser = stage_parser("base")
    add_curve(parser)
    args = parser.parse_args(argv)
    run_base(load_checked_spec(args, "base"), args.out, args.curve, progress=not args.no_progress)

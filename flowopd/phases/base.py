"""Phase `base`: the tiny world pretrains its base model by flow matching on the world's renders; an sd3 spec's
base is its pretrained model, written as a model artifact without an adapter (so it is evaluated as the first row,
like SD3.5-M in the paper's tables).

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
from flowopd.runtime.records import Meter, budget


def run_base(spec, out: Path, curve_path: Path | None = None, progress: bool = True) -> None:
    if spec.model.kind != "tiny":
        if curve_path is not None:
            raise SystemExit("an sd3 base is not trained: it has no curve")
        record_pretrained_base(spec, out)
        return
    started, start = now(), time.time()  # like every phase's clock, it covers the model library's import
    meter = Meter()  # the base's own budget (in no model's total: it plays the pretrained model)
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
            budget=budget(meter.spent(), shared_base=True),
        )
    if curve_path is not None:
        write_curve(curve_path, curve)


def record_pretrained_base(spec, out: Path) -> None:
    """An sd3 base: a model artifact with no adapter, which flowopd.models.loading reads as the bare pretrained
    model. It names the weights (model.pretrained, model.revision) rather than holding or hashing them."""
    started, start, meter = now(), time.time(), Meter()
    with atomic_folder(out) as folder:
        write_provenance(folder, "base", sub_spec(spec, "base"), **spec_identity(spec), started=started,
                         finished=now(), seconds=round(time.time() - start, 2),
                         pretrained=spec.model.pretrained, revision=spec.model.revision,
                         budget=budget(meter.spent(), shared_base=True))


def main(argv: list[str] | None = None) -> None:
    refuse_several_processes("base")
    parser = stage_parser("base")
    add_curve(parser)
    args = parser.parse_args(argv)
    run_base(load_checked_spec(args, "base"), args.out, args.curve, progress=not args.no_progress)

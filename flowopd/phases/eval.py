"""Phase `eval`: a model artifact on every benchmark (each task's prompts of `evaluation.split`) for every
evaluation seed; meta.json and metrics.json record the split (val: tuning only, never in the report).

    python stages/eval.py --spec SPEC --model DIR --data DIR --label LABEL --out DIR [--metrics JSON]

The folder holds metrics.json (per benchmark and metric: each seed's mean, their mean and std), samples.jsonl (every
sample's scores, what the ledger's bootstrap resamples) and an image grid per benchmark. `--metrics` also writes the
small file DVC shows (`dvc metrics show`, `dvc exp show`): the model's label and, keyed by what they measure, each
benchmark's headline metric and `avg` (mean over benchmarks of headline / normaliser, as the report's).
Several processes (FLOWOPD_PROCESSES, an accelerate config) split the sampling; the main one writes. The model and
prompt folders are checked against their producers' records first; meta.json keeps `model_sha256` (the weights
evaluated) beside `model_recorded_sha256` (their producer's `weights_sha256`) for the ledger to compare. The run
record names the model's training seed (from the model's spec.json; null for the base), which the ledger keeps.
Finished batches are kept in `.<out>.scored-<key>` beside the folder until the evaluation succeeds, so a rerun after a
failure (a reward server that died) samples and scores only the rest; the key hashes the weights, the evaluation's
sub-spec and the package's code, and another key's folder is stale (removed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import flowopd
from flowopd.phases.keys import artifact_training_seed, sub_spec, sub_spec_hash
from flowopd.phases.stage_cli import load_checked_spec, stage_parser
from flowopd.runtime.artifacts import (
    META,
    atomic_folder,
    now,
    spec_identity,
    verify_artifact,
    write_json,
    write_provenance,
)
from flowopd.runtime.launch import relaunch_if_asked


def dvc_metrics(spec, label: str, headline: dict[str, float]) -> dict:
    """{"model": label, <benchmark>: headline value, ..., "avg": mean of headline / normaliser}."""
    avg = sum(value / spec.tasks[task].normaliser for task, value in headline.items()) / len(headline)
    return {"model": label, **headline, "avg": avg}


def code_hash() -> str:
    """sha256 of the package's Python sources: any code change makes earlier kept batches stale."""
    root, digest = Path(flowopd.__file__).parent, hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def kept_batches_folder(spec, out: Path, model_sha256: str | None, clean: bool) -> Path:
    """`.<out>.scored-<key>` beside `out`: this evaluation's finished batches until it succeeds; clean: remove the
    folders of other keys (other weights, settings or code: never reused)."""
    key = hashlib.sha256(f"{model_sha256}:{sub_spec_hash(spec, 'eval')}:{code_hash()}".encode()).hexdigest()[:16]
    folder = Path(out).parent / f".{Path(out).name}.scored-{key}"
    if clean:
        for stale in Path(out).parent.glob(f".{Path(out).name}.scored-*"):
            if stale != folder and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
    return folder


def run_eval(
    spec, model_dir: Path, data_dir: Path, label: str, out: Path, metrics_path: Path | None = None, progress=True
) -> None:
    """Evaluate a model artifact; several processes (accelerate launch) split the sampling, the main one writes."""
    from flowopd.evaluation.benchmark import ScoredBatches, evaluate
    from flowopd.models.bundle import embed_and_release
    from flowopd.models.loading import load_model, weights_sha
    from flowopd.runtime.processes import Processes
    from flowopd.world.prompt_sets import read_prompts

    started, start = now(), time.time()
    processes = Processes.from_environment()
    model_sha256 = weights_sha(model_dir)  # checked against the record of the phase that wrote it, like the data
    verify_artifact(data_dir)
    model_meta = json.loads((Path(model_dir) / META).read_text(encoding="utf-8"))
    model_spec = json.loads((Path(model_dir) / "spec.json").read_text(encoding="utf-8"))
    bundle = load_model(spec, model_dir, processes.device)
    evaluation = spec.evaluation  # sd3: every benchmark prompt embedded once, then the text encoders freed
    embed_and_release(bundle, [p.text for task in evaluation.benchmarks
                               for p in read_prompts(data_dir, task, evaluation.split)[: evaluation.n_prompts]],
                      evaluation.micro_batch)
    kept_folder = kept_batches_folder(spec, out, model_sha256, clean=processes.is_main)
    kept = ScoredBatches(kept_folder)
    if not processes.is_main:
        evaluate(bundle, spec, data_dir, None, progress=False, processes=processes, kept=kept)
        processes.wait()
        return
    with atomic_folder(out) as folder:
        record = evaluate(bundle, spec, data_dir, folder, progress=progress, processes=processes, kept=kept)
        write_provenance(
            folder,
            "eval",
            sub_spec(spec, "eval"),
            **spec_identity(spec),
            model=label,
            split=evaluation.split,
            model_dir=str(model_dir),
            model_sha256=model_sha256,
            model_recorded_sha256=model_meta.get("weights_sha256"),
            model_sections_hash=model_meta["sections_hash"],
            training_seed=artifact_training_seed(model_meta.get("phase"), model_spec),
            processes=processes.count,
            started=started,
            finished=now(),
            seconds=round(time.time() - start, 2),
        )
    shutil.rmtree(kept_folder, ignore_errors=True)  # the evaluation is in place: nothing left to resume
    if metrics_path is not None:
        write_json(metrics_path, dvc_metrics(spec, label, record["headline"]))
    processes.wait()


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        relaunch_if_asked()  # the evaluation splits over processes (FLOWOPD_PROCESSES, an accelerate config)
    parser = stage_parser("eval")
    parser.add_argument("--model", required=True, type=Path, help="model artifact folder")
    parser.add_argument("--data", required=True, type=Path, help="prompt sets folder (data phase)")
    parser.add_argument("--label", required=True, help="row label in the report, e.g. base, flow_opd")
    parser.add_argument("--metrics", type=Path, help="also write the headline metrics here (DVC metrics)")
    args = parser.parse_args(argv)
    spec = load_checked_spec(args, "eval")
    run_eval(spec, args.model, args.data, args.label, args.out, args.metrics, progress=not args.no_progress)

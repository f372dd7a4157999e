"""The phases a stage runs: each reads the resolved spec, writes one artifact folder atomically (its run record beside).

A phase depends only on its own sections of the spec (PHASE_SECTIONS), which is what keys its DVC stage: two specs
whose sections agree share the artifact, and editing evaluation settings never retrains a model.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

from flowopd.artifacts import (
    atomic_folder,
    canonical_hash,
    curve_without_timing,
    now,
    sha256_file,
    write_json,
    write_provenance,
)

PHASE_SECTIONS = {
    "data": ("seed", "world", "tasks"),
    "base": ("seed", "world", "model", "base"),
    "eval": ("world", "tasks", "evaluation"),
}
MODEL_SECTIONS = {"tiny": ("seed", "world", "model", "base"), "sd3": ("seed", "world", "model")}


def sub_spec(spec, phase: str) -> dict:
    """The resolved part of the spec a phase depends on (JSON-ready)."""
    return spec.sections(*PHASE_SECTIONS[phase])


def sub_spec_hash(spec, phase: str) -> str:
    return spec.section_hash(*PHASE_SECTIONS[phase])


# The training phases depend on parts of sections (one teacher, some tasks), so their sub-specs are built here, next
# to each other: a stage key is the hash of its sub-spec, and a downstream sub-spec nests its inputs' sub-specs.
def starting_model_sub_spec(spec) -> dict:
    """What the starting model is: the tiny base's sections, or the sd3 model section."""
    return spec.sections(*MODEL_SECTIONS[spec.model.kind])


def teacher_sub_spec(spec, name: str) -> dict:
    """A teacher: the starting model, its task, its own settings (sampler resolved). Not its name: two teachers
    with the same task and settings are one artifact."""
    teacher = spec.teachers[name]
    return starting_model_sub_spec(spec) | {
        "tasks": {teacher.task: spec.tasks[teacher.task].model_dump(mode="json")},
        "teacher": teacher.model_dump(mode="json"),
    }


def baseline_sub_spec(spec) -> dict:
    """The mixed-reward baseline: the starting model, the weighted tasks, the baseline section."""
    return starting_model_sub_spec(spec) | {
        "tasks": {task: spec.tasks[task].model_dump(mode="json") for task in spec.baseline.weights},
        "baseline": spec.baseline.model_dump(mode="json"),
    }


def cold_start_sub_spec(spec) -> dict:
    """The student's starting point: the starting model for `none`; else the teachers, the router, the method, and
    for `sft` the tasks (their train prompts and rewards)."""
    if spec.cold_start.method == "none":
        return starting_model_sub_spec(spec)
    tasks = spec.sections("tasks") if spec.cold_start.method == "sft" else {}
    return starting_model_sub_spec(spec) | tasks | {
        "teachers": {name: teacher_sub_spec(spec, name) for name in spec.teachers},
        "router": spec.router.model_dump(mode="json"),
        "cold_start": spec.cold_start.model_dump(mode="json"),
    }


def opd_sub_spec(spec) -> dict:
    """The distilled student: its cold start, every teacher, all tasks (the training prompts), router, OPD, MAR."""
    return {
        "cold_start": cold_start_sub_spec(spec),
        "teachers": {name: teacher_sub_spec(spec, name) for name in spec.teachers},
        **spec.sections("tasks", "router", "opd", "mar"),
    }


def stage_key(sub_spec_data: dict) -> str:
    """The 10-hex-digit key naming a stage and its artifact folder."""
    return canonical_hash(sub_spec_data)[:10]


def spec_identity(spec) -> dict:
    from flowopd.spec import spec_hash

    return {"spec_name": spec.name, "spec_label": spec.label, "spec_hash": spec_hash(spec)}


def run_data(spec, out: Path) -> None:
    from flowopd.data import build_prompt_sets, write_prompt_sets

    started, start = now(), time.time()
    with atomic_folder(out) as folder:
        sets = build_prompt_sets(spec)
        write_prompt_sets(sets, folder)
        counts = {task: {split: len(p) for split, p in splits.items()} for task, splits in sets.items()}
        write_provenance(folder, "data", sub_spec(spec, "data"), **spec_identity(spec), prompt_counts=counts,
                         started=started, finished=now(), seconds=round(time.time() - start, 2))


def run_base(spec, out: Path, curve_path: Path | None = None, progress: bool = True) -> None:
    if spec.model.kind != "tiny":
        raise SystemExit("the base phase pretrains tiny models only; an sd3 spec starts from its pretrained weights")
    started, start = now(), time.time()  # like every phase's clock, it covers the model library's import
    from flowopd.pretrain import pretrain

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


def run_eval(
    spec, model_dir: Path, data_dir: Path, label: str, out: Path, metrics_path: Path | None = None, progress=True
) -> None:
    """Evaluate a model artifact; several processes (accelerate launch) split the sampling, the main one writes."""
    from flowopd.distributed import Processes
    from flowopd.evaluate import evaluate
    from flowopd.models.loading import load_model, weights_sha

    started, start = now(), time.time()
    processes = Processes.from_environment()
    bundle = load_model(spec, model_dir, processes.device)
    if not processes.is_main:
        evaluate(bundle, spec, data_dir, None, progress=False, processes=processes)
        processes.wait()
        return
    with atomic_folder(out) as folder:
        record = evaluate(bundle, spec, data_dir, folder, progress=progress, processes=processes)
        write_provenance(
            folder,
            "eval",
            sub_spec(spec, "eval"),
            **spec_identity(spec),
            model=label,
            model_dir=str(model_dir),
            model_sha256=weights_sha(model_dir),
            model_sections_hash=json.loads((Path(model_dir) / "meta.json").read_text())["sections_hash"],
            processes=processes.count,
            started=started,
            finished=now(),
            seconds=round(time.time() - start, 2),
        )
    if metrics_path is not None:  # the small file `dvc metrics show` / `dvc exp show` read
        write_json(metrics_path, {label: record["headline"]})
    processes.wait()


def write_curve(path: Path, rows: list[dict]) -> None:
    """A training curve as CSV, without its timing columns (they vary run to run: the run record keeps them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = curve_without_timing(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def phase_sub_spec(spec, phase: str, teacher: str | None = None) -> dict:
    """The sub-spec that keys a stage of `phase` (its artifact's spec.json)."""
    if phase in PHASE_SECTIONS:
        return sub_spec(spec, phase)
    if phase == "teacher":
        return teacher_sub_spec(spec, teacher)
    return {"baseline": baseline_sub_spec, "cold_start": cold_start_sub_spec, "opd": opd_sub_spec}[phase](spec)


KEYED_FOLDER = re.compile(r"(?:.+-)?([0-9a-f]{10})")  # artifacts/<phase>/<key>, artifacts/eval/<model key>-<key>


def check_stage_key(spec, spec_path, phase: str, out: Path, teacher: str | None = None) -> None:
    """Refuse to write a stage folder named for other settings: its name, its stage key and its meta.json must agree.

    A mismatch means the spec changed after dvc.yaml was written, as `dvc exp run -S` does (it cannot rename stages).
    Folders not named by a key (hand-run stages) are not checked."""
    named = KEYED_FOLDER.fullmatch(Path(out).name)
    if named is None:
        return
    try:
        key = stage_key(phase_sub_spec(spec, phase, teacher))
    except (KeyError, AttributeError):  # no such teacher, no baseline section: the phase names the problem itself
        return
    if named.group(1) == key:
        return
    raise SystemExit(
        f"{phase}: {out} is named for key {named.group(1)}, but {spec_path} now gives this stage the key {key}: the "
        "spec changed after dvc.yaml was written (`dvc exp run -S` does that, and cannot rename stages), so the "
        "folder would not say what made it. Run the experiment with `flowopd exp run -S FILE:KEY=VALUE ...` (it "
        "edits the spec, re-keys dvc.yaml, then runs `dvc exp run`), or edit the spec and run "
        "`flowopd pipeline write` before `dvc repro` or `dvc exp run`.")


def stage_main(phase: str, argv: list[str] | None = None) -> None:
    """Command line of the thin `stages/<phase>.py` entry points that dvc.yaml runs."""
    import argparse

    from flowopd.launch import refuse_several_processes, relaunch_if_asked
    from flowopd.spec import load_spec_or_exit

    if phase == "eval" and argv is None:
        relaunch_if_asked()  # the evaluation splits over processes (FLOWOPD_PROCESSES, an accelerate config)
    elif phase != "eval":
        refuse_several_processes(phase)
    parser = argparse.ArgumentParser(prog=f"stages/{phase}.py", description=f"run the {phase} phase of a spec")
    parser.add_argument("--spec", required=True, type=Path, help="spec YAML file")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    if phase == "eval":
        parser.add_argument("--model", required=True, type=Path, help="model artifact folder")
        parser.add_argument("--data", required=True, type=Path, help="prompt sets folder (data phase)")
        parser.add_argument("--label", required=True, help="row label in the report, e.g. base, flow_opd")
        parser.add_argument("--metrics", type=Path, help="also write the headline metrics here (DVC metrics)")
    if phase == "base":
        parser.add_argument("--curve", type=Path, help="also write the loss curve here (DVC plots)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    spec = load_spec_or_exit(args.spec)
    progress = not args.no_progress
    check_stage_key(spec, args.spec, phase, args.out)
    if phase == "data":
        run_data(spec, args.out)
    elif phase == "base":
        run_base(spec, args.out, args.curve, progress=progress)
    elif phase == "eval":
        run_eval(spec, args.model, args.data, args.label, args.out, args.metrics, progress=progress)
    else:
        raise SystemExit(f"unknown phase {phase!r}")

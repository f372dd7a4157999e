"""Stage keys: the part of a spec each phase reads (its sub-spec), and the key that names its DVC stage and folder.

A phase depends only on its own part of the spec, so two specs whose parts agree share one artifact, and editing the
evaluation settings never retrains a model. The training phases read parts of sections (one teacher, some tasks),
so their sub-specs are built here, side by side: a stage key is the hash of its sub-spec, and a downstream sub-spec
nests those of its inputs (the OPD student's holds its cold start's, which holds the teachers').

Training seeds (the spec's `training_seeds`, docs/specs.md#training-seeds): the phases after the base run once per
seed index i. Seed 0's sub-specs are what a one-seed spec has always had, so its keys never change; seed i > 0 adds
`training_seed: i` to a trained phase's sub-spec and nests its inputs' seed-i sub-specs (a seed-1 student descends
from the seed-1 teachers and cold start). Data, base and the evaluation settings are shared by every seed.
"""

from __future__ import annotations

import re
from pathlib import Path

from flowopd.spec.hashing import canonical_hash

PHASE_SECTIONS = {
    "data": ("seed", "world", "tasks"),
    "base": ("seed", "world", "model", "base"),
    "eval": ("world", "tasks", "evaluation"),
}
MODEL_SECTIONS = {"tiny": ("seed", "world", "model", "base"), "sd3": ("seed", "world", "model")}
TRAINED_PHASES = ("teacher", "baseline", "cold_start", "opd")  # run once per training seed


def seeded(sub_spec_data: dict, training_seed: int) -> dict:
    """A trained phase's sub-spec for a training seed: seed 0's as it is, seed i > 0's with `training_seed: i`."""
    return (sub_spec_data | {"training_seed": training_seed}) if training_seed else sub_spec_data


def artifact_training_seed(phase: str | None, sub_spec_data: dict) -> int | None:
    """The training seed index of an artifact, from its phase and spec.json; None for data and base (shared)."""
    return sub_spec_data.get("training_seed", 0) if phase in TRAINED_PHASES else None


def sub_spec(spec, phase: str) -> dict:
    """The resolved part of the spec a phase depends on (JSON-ready)."""
    return spec.sections(*PHASE_SECTIONS[phase])


def sub_spec_hash(spec, phase: str) -> str:
    return spec.section_hash(*PHASE_SECTIONS[phase])


def starting_model_sub_spec(spec) -> dict:
    """What the starting model is: the tiny base's sections, or the sd3 model section."""
    return spec.sections(*MODEL_SECTIONS[spec.model.kind])


def teacher_sub_spec(spec, name: str, training_seed: int = 0) -> dict:
    """A teacher: the starting model, its task, its own settings (sampler resolved). Not its name: two teachers
    with the same task and settings are one artifact."""
    teacher = spec.teachers[name]
    return seeded(starting_model_sub_spec(spec) | {
        "tasks": {teacher.task: spec.tasks[teacher.task].model_dump(mode="json")},
        "teacher": teacher.model_dump(mode="json"),
    }, training_seed)


def baseline_sub_spec(spec, training_seed: int = 0) -> dict:
    """The mixed-reward baseline: the starting model, the weighted tasks, the baseline section."""
    return seeded(starting_model_sub_spec(spec) | {
        "tasks": {task: spec.tasks[task].model_dump(mode="json") for task in spec.baseline.weights},
        "baseline": spec.baseline.model_dump(mode="json"),
    }, training_seed)


def cold_start_sub_spec(spec, training_seed: int = 0) -> dict:
    """The student's starting point: the starting model for `none` (the shared base, whatever the seed); else the
    teachers, the router, the method, and for `sft` the tasks (their train prompts and rewards)."""
    if spec.cold_start.method == "none":
        return starting_model_sub_spec(spec)
    tasks = spec.sections("tasks") if spec.cold_start.method == "sft" else {}
    cold_start = spec.cold_start.model_dump(mode="json")
    if spec.cold_start.method == "sft" and spec.cold_start.target_sampler == "evaluation":
        cold_start["sampler"] = spec.evaluation.sampler.model_dump(mode="json")  # the sampler the targets come from
    return seeded(starting_model_sub_spec(spec) | tasks | {
        "teachers": {name: teacher_sub_spec(spec, name, training_seed) for name in spec.teachers},
        "router": spec.router.model_dump(mode="json"),
        "cold_start": cold_start,
    }, training_seed)


def opd_sub_spec(spec, training_seed: int = 0) -> dict:
    """The distilled student: its cold start, every teacher, all tasks (the training prompts), router, OPD, MAR."""
    return seeded({
        "cold_start": cold_start_sub_spec(spec, training_seed),
        "teachers": {name: teacher_sub_spec(spec, name, training_seed) for name in spec.teachers},
        **spec.sections("tasks", "router", "opd", "mar"),
    }, training_seed)


def stage_key(sub_spec_data: dict) -> str:
    """The 10-hex-digit key naming a stage and its artifact folder."""
    return canonical_hash(sub_spec_data)[:10]


def phase_sub_spec(spec, phase: str, teacher: str | None = None, training_seed: int = 0) -> dict:
    """The sub-spec that keys a stage of `phase` (its artifact's spec.json); data, base and eval have no seed."""
    if phase in PHASE_SECTIONS:
        return sub_spec(spec, phase)
    if phase == "teacher":
        return teacher_sub_spec(spec, teacher, training_seed)
    by_phase = {"baseline": baseline_sub_spec, "cold_start": cold_start_sub_spec, "opd": opd_sub_spec}
    return by_phase[phase](spec, training_seed)


KEYED_FOLDER = re.compile(r"(?:.+-)?([0-9a-f]{10})")  # artifacts/<phase>/<key>, artifacts/eval/<model key>-<key>


def check_stage_key(spec, spec_path, phase: str, out: Path, teacher: str | None = None,
                    training_seed: int = 0) -> None:
    """Refuse to write a stage folder named for other settings: its name, its stage key and its meta.json must agree.

    A mismatch means the spec changed after dvc.yaml was written, as `dvc exp run -S` does (it cannot rename stages).
    Folders not named by a key (hand-run stages) are not checked."""
    named = KEYED_FOLDER.fullmatch(Path(out).name)
    if named is None:
        return
    try:
        key = stage_key(phase_sub_spec(spec, phase, teacher, training_seed))
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

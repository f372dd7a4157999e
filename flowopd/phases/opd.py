"""Phase `opd` (the paper's third stage): the student, from its cold start, distilled on-policy from the teacher
each prompt is routed to, with MAR (flowopd.methods.opd_trainer).

    python stages/opd.py --spec SPEC [--training-seed I] --init DIR [--base DIR] --teacher NAME=DIR ... --data DIR
        --out DIR [--curve CSV]

Tiny world: the student and every teacher are whole TinyBundles sharing the frozen text encoder. sd3: student,
teachers and anchor are LoRA adapters on ONE frozen base, switched per routed group (no model copy per teacher).
FLOWOPD_PROCESSES=N runs it in N processes.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from flowopd.methods.opd_trainer import OPDTrainer
from flowopd.methods.router import Router, format_summary
from flowopd.models.bundle import embed_and_release
from flowopd.models.loading import weights_sha
from flowopd.phases.keys import opd_sub_spec
from flowopd.phases.stage_cli import (
    add_curve,
    add_model_inputs,
    add_training_seed,
    load_checked_spec,
    parse_teacher_dirs,
    stage_parser,
)
from flowopd.runtime.artifacts import now, verify_artifact
from flowopd.runtime.launch import relaunch_if_asked
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import Meter
from flowopd.train.policy import ADAPTER
from flowopd.train.rollouts import rollout_texts
from flowopd.train.trainer import lora_settings, run_training
from flowopd.world.prompt_sets import training_prompts


def run_opd(spec, init_dir: Path, base_dir: Path | None, teacher_dirs: dict, data_dir: Path, out: Path,
            curve_path: Path | None = None, progress: bool = True, training_seed: int = 0) -> None:
    """OPD from the cold-start artifact `init_dir` on all tasks' train prompts; writes `out` atomically (the EMA
    student: a TinyBundle, or an sd3 adapter; curve.csv, provenance). Resumes from `<out>.ckpt` like every
    trainer (flowopd.train.trainer). sd3: student, teachers and anchor are adapters on ONE frozen base (sd3_models).
    The cold start and teachers are the training seed's; the student trains with its seed."""
    sub_spec = opd_sub_spec(spec, training_seed)
    spec = spec.for_training_seed(training_seed)  # from here on `seed` is the training seed's
    started, start, settings = now(), time.time(), spec.opd
    meter = Meter()  # the budget: the student's rollouts, its teachers' and anchor's forwards, its steps
    processes = Processes.from_environment()
    verify_artifact(data_dir)  # and every model folder as it loads (tiny_models, sd3_models)
    prompts, tasks = training_prompts(spec, data_dir)
    router = Router.from_spec(spec)
    routes = router.route_all(prompts, tasks)
    counts = router.summary(prompts, tasks)
    if processes.is_main:
        print(format_summary(counts))
    anchor_name = spec.mar.anchor if spec.mar.weight > 0 else None
    needed = [*counts, *([anchor_name] if anchor_name and anchor_name not in counts else [])]
    if spec.model.kind == "tiny":
        student, models = tiny_models(init_dir, needed, teacher_dirs, base_dir)
        lora, init_adapter = lora_settings(spec, settings), None
    else:
        student, models, lora, init_adapter = sd3_models(spec, init_dir, needed, teacher_dirs, processes.device)
        texts = rollout_texts(prompts, settings.prompts_per_step, settings.group_size, settings.steps, spec.seed,
                              processes)
        embed_and_release(student, texts, settings.micro_batch)  # every prompt this process samples, once
    trainer = OPDTrainer(student, settings, prompts, routes, {n: models[n] for n in counts},
                         models.get(anchor_name), spec.mar.weight, seed=spec.seed, lora=lora,
                         init_adapter=init_adapter, processes=processes)
    if spec.model.kind == "sd3":
        student.set_adapter(ADAPTER)  # the student rolls out; teachers switch in per forward (adapter_velocity)
    folders = {n: base_dir if n == "base" else teacher_dirs[n] for n in models if n != "base" or base_dir}
    inputs = {"init_sha256": weights_sha(init_dir), "teachers": {n: weights_sha(f) for n, f in folders.items()}}
    prompt_digest = hashlib.sha256("\n".join(f"{t}\t{p.text}" for p, t in zip(prompts, tasks)).encode()).hexdigest()
    provenance = {
        "estimator": settings.estimator, "routing": counts, "anchor": anchor_name, "mar_weight": spec.mar.weight,
        "init_dir": str(init_dir), "init_sha256": inputs["init_sha256"],
        "teachers": {n: {"dir": str(f), "sha256": inputs["teachers"][n]} for n, f in folders.items()},
    }
    run_training(trainer, spec=spec, phase="opd", out=out, sub_spec=sub_spec,
                 inputs={"inputs": inputs, "prompts": prompt_digest}, provenance=provenance, started=started,
                 start=start, curve_path=curve_path, progress=progress, meter=meter,
                 parents=[init_dir, *folders.values()])  # the cold start holds its teachers; they count once


def tiny_models(init_dir: Path, names: list[str], teacher_dirs: dict, base_dir: Path | None):
    """The student (the cold-start TinyBundle) and the named teachers ("base" included) as frozen TinyBundles."""
    from flowopd.models.loading import load_teachers
    from flowopd.models.tiny import TinyBundle

    verify_artifact(init_dir)
    student = TinyBundle.load(init_dir)
    models = load_teachers(names, teacher_dirs, base_dir, config=student.config)
    student_text = student.text_encoder.state_dict()
    for name, model in models.items():
        if any(not torch.equal(v, student_text[k]) for k, v in model.text_encoder.state_dict().items()):
            raise SystemExit(f"{name}'s text encoder differs from the student's: OPD evaluates every teacher on the "
                             "student's prompt embeddings, so all must share the frozen encoder")
    return student, models


def sd3_models(spec, init_dir: Path, names: list[str], teacher_dirs: dict, device):
    """The adapter plan: ONE frozen SD3 base; each named teacher's adapter loaded beside it (frozen), "base" the
    bare base. -> (bundle, {name: velocity}, the student's LoRA settings, its starting adapter or None).
    The student starts from the cold start's adapter (merge) or, without one (none), a fresh adapter (B = 0)."""
    from flowopd.models.loading import load_bundle, require_teacher_dirs
    from flowopd.models.sd3 import ADAPTER_WEIGHTS, read_adapter
    from flowopd.spec import LoraSettings

    if ADAPTER in names:
        raise SystemExit(f"a teacher may not be named {ADAPTER!r}: the student's adapter has that name")
    require_teacher_dirs(names, teacher_dirs)
    for folder in [init_dir, *(teacher_dirs[name] for name in names if name != "base")]:
        verify_artifact(folder)  # before the base model's slow load
    bundle = load_bundle(spec, None, device)
    for name in names:
        if name != "base":
            bundle.load_adapter(name, teacher_dirs[name], trainable=False)
    velocities = {name: bundle.adapter_velocity(None if name == "base" else name) for name in names}
    if (Path(init_dir) / ADAPTER_WEIGHTS).exists():
        init_adapter, config = read_adapter(init_dir)
        return bundle, velocities, LoraSettings(**config), init_adapter
    lora = lora_settings(spec, spec.opd)
    if lora is None:
        raise SystemExit("OPD on sd3 trains a LoRA adapter beside the teachers' on one frozen base: set opd.lora "
                         "or model.lora")
    return bundle, velocities, lora, None


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        relaunch_if_asked()
    parser = stage_parser("opd")
    parser.add_argument("--init", required=True, type=Path, help="cold-start artifact folder (the student)")
    add_model_inputs(parser, data_required=True, teachers=True)
    add_curve(parser)
    add_training_seed(parser)
    args = parser.parse_args(argv)
    spec = load_checked_spec(args, "opd")
    teacher_dirs = parse_teacher_dirs(args.teacher, spec)
    run_opd(spec, args.init, args.base, teacher_dirs, args.data, args.out, args.curve, not args.no_progress,
            args.training_seed)

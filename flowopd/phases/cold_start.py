"""Phase `cold_start` (the paper's second stage): the student's starting point, a merge of the teachers, SFT on their
samples, or the base itself (`cold_start.method`: merge, sft, none).

    python stages/cold_start.py --spec SPEC [--training-seed I] [--base DIR] --teacher NAME=DIR ... [--data DIR]
        --out DIR

merge and none run in one process; sft splits over FLOWOPD_PROCESSES=N processes. An sd3 student is a LoRA adapter
beside the teachers' on one frozen base: merged adapters (flowopd.methods.merge.merged_adapter) or a new one fitted
by SFT.
"""

from __future__ import annotations

import time
from pathlib import Path

from flowopd.methods.merge import merge_states, merged_adapter
from flowopd.methods.router import Router
from flowopd.methods.sft import sft_cold_start
from flowopd.models.loading import load_bundle, load_teachers, require_teacher_dirs, weights_sha
from flowopd.phases.keys import cold_start_sub_spec
from flowopd.phases.stage_cli import (
    add_model_inputs,
    add_training_seed,
    load_checked_spec,
    parse_teacher_dirs,
    stage_parser,
)
from flowopd.runtime.artifacts import (
    atomic_folder,
    now,
    sha256_file,
    spec_identity,
    verify_artifact,
    write_curve,
    write_provenance,
)
from flowopd.runtime.launch import refuse_several_processes, relaunch_if_asked
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import Meter, budget
from flowopd.spec.hashing import canonical_hash
from flowopd.train.policy import ADAPTER, save_policy
from flowopd.train.trainer import spent
from flowopd.world.prompt_sets import training_prompts


# ---------------------------------------------------------------- the phase
def run_cold_start(spec, base_dir: Path | None, teacher_dirs: dict, data_dir: Path | None, out: Path,
                   progress: bool = True, training_seed: int = 0) -> None:
    """Write the student's starting model to `out` atomically (a TinyBundle, curve.csv for sft, provenance). Every
    input folder is checked against its producer's record before it is read (models as they load). The teachers
    are the training seed's; sft samples and trains with its seed."""
    sub_spec = cold_start_sub_spec(spec, training_seed)
    spec = spec.for_training_seed(training_seed)  # from here on `seed` is the training seed's
    if spec.model.kind == "sd3":
        return sd3_cold_start(spec, sub_spec, teacher_dirs, data_dir, out, progress)
    started, start, meter = now(), time.time(), Meter()  # the budget: SFT's teacher samples, forwards and steps
    settings, method = spec.cold_start, spec.cold_start.method
    processes = Processes.from_environment()  # several only for sft (main refuses them otherwise)
    bundle = load_bundle(spec, base_dir)
    extra, curve, used = {}, None, []
    if method == "merge":
        used = [name for name, weight in settings.weights.items() if weight > 0]
        teachers = load_teachers(used, teacher_dirs, config=bundle.config)
        merged = merge_states(bundle.state_dict(), [teachers[n].state_dict() for n in used],
                              [settings.weights[n] for n in used], settings.mode, settings.ties_density, settings.scale)
        bundle.load_state_dict(merged)
        extra = {"mode": settings.mode, "weights": {n: settings.weights[n] for n in used}}
    elif method == "sft":
        if data_dir is None:
            raise SystemExit("an sft cold start samples the train prompts: pass --data")
        verify_artifact(data_dir)
        prompts, tasks = training_prompts(spec, data_dir)
        used = list(Router.from_spec(spec).summary(prompts, tasks))
        teachers = load_teachers(used, teacher_dirs, base_dir, config=bundle.config)
        curve, extra = sft_cold_start(spec, bundle, teachers, prompts, tasks, progress, processes)
        extra["prompts_sha256"] = canonical_hash([p.text for p in prompts])
    elif method != "none":
        raise SystemExit(f"unknown cold start method {method!r}")
    lora = getattr(settings, "lora", None)
    spending = spent(meter, processes)  # every process takes part
    if not processes.is_main:  # the same weights everywhere; the main process writes them
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = save_policy(bundle, folder, lora)
        if curve:
            write_curve(folder / "curve.csv", curve)
        write_provenance(
            folder, "cold_start", sub_spec, **spec_identity(spec), method=method, **extra, curve=curve,
            base_dir=None if base_dir is None else str(base_dir), base_sha256=weights_sha(base_dir),
            teachers={n: {"dir": str(teacher_dirs[n]), "sha256": weights_sha(teacher_dirs[n])}
                      for n in used if n != "base"},
            processes=processes.count, started=started, finished=now(), seconds=round(time.time() - start, 2),
            weights_sha256=sha256_file(weights_file),
            budget=budget(spending, [teacher_dirs[n] for n in used if n != "base"]),
        )
    processes.wait()


def sd3_cold_start(spec, sub_spec: dict, teacher_dirs: dict, data_dir: Path | None, out: Path,
                   progress: bool = True) -> None:
    """sd3: the student's starting adapter. merge: from the teachers' (merged_adapter; no model is loaded). sft: a
    new adapter on the base fitted to samples of the teachers' adapters, all on one transformer. none: an artifact
    without adapter (OPD starts a fresh one on the base)."""
    from flowopd.models.sd3 import read_adapter, write_adapter

    started, start, meter = now(), time.time(), Meter()  # the budget: SFT's teacher samples, forwards and steps
    settings, method = spec.cold_start, spec.cold_start.method
    processes = Processes.from_environment()  # several only for sft (main refuses them otherwise)
    extra, used, write_weights, curve = {}, [], None, None  # write_weights(folder) -> the weights file
    if method == "merge":
        used = [name for name, weight in settings.weights.items() if weight > 0]
        require_teacher_dirs(used, teacher_dirs)
        for name in used:
            verify_artifact(teacher_dirs[name])
        adapters = [read_adapter(teacher_dirs[name]) for name in used]
        state, config = merged_adapter([a for a, _ in adapters], [c for _, c in adapters],
                                       [settings.weights[n] for n in used], settings.mode, settings.ties_density,
                                       settings.scale, settings.lora_merge)
        extra = {"mode": settings.mode, "weights": {n: settings.weights[n] for n in used}, "rank": config["rank"]}

        def write_weights(folder):
            return write_adapter(folder, state, config)
    elif method == "sft":
        if data_dir is None:
            raise SystemExit("an sft cold start samples the train prompts: pass --data")
        lora = settings.lora or spec.model.lora
        if lora is None:
            raise SystemExit("an sd3 student is a LoRA adapter beside the teachers': set cold_start.lora or model.lora")
        verify_artifact(data_dir)
        prompts, tasks = training_prompts(spec, data_dir)
        used = list(Router.from_spec(spec).summary(prompts, tasks))
        require_teacher_dirs(used, teacher_dirs)
        for name in used:
            if name != "base":
                verify_artifact(teacher_dirs[name])  # before the base model's slow load
        bundle = load_bundle(spec, None, processes.device)
        for name in used:
            if name != "base":
                bundle.load_adapter(name, teacher_dirs[name], trainable=False)
        teachers = {name: bundle.adapter_bundle(None if name == "base" else name) for name in used}
        sft_spec = spec.model_copy(update={"cold_start": settings.model_copy(update={"lora": lora})})  # sft trains it
        curve, extra = sft_cold_start(sft_spec, bundle, teachers, prompts, tasks, progress, processes)
        extra["prompts_sha256"] = canonical_hash([p.text for p in prompts])

        def write_weights(folder):
            write_curve(folder / "curve.csv", curve)
            return bundle.save_adapter(ADAPTER, folder, lora.model_dump(mode="json"))
    spending = spent(meter, processes)  # every process takes part
    if not processes.is_main:  # the same adapter everywhere; the main process writes it
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = write_weights(folder) if write_weights is not None else None
        write_provenance(
            folder, "cold_start", sub_spec, **spec_identity(spec), method=method, **extra, curve=curve,
            teachers={n: {"dir": str(teacher_dirs[n]), "sha256": weights_sha(teacher_dirs[n])}
                      for n in used if n != "base"},
            processes=processes.count, started=started, finished=now(), seconds=round(time.time() - start, 2),
            weights_sha256=None if weights_file is None else sha256_file(weights_file),
            budget=budget(spending, [teacher_dirs[n] for n in used if n != "base"]),
        )
    processes.wait()


def main(argv: list[str] | None = None) -> None:
    """sft: FLOWOPD_PROCESSES=N, N processes; merge and none: one."""
    parser = stage_parser("cold_start")
    add_model_inputs(parser, data_required=False, teachers=True)
    add_training_seed(parser)
    args = parser.parse_args(argv)
    spec = load_checked_spec(args, "cold_start")
    if spec.cold_start.method != "sft":
        refuse_several_processes("cold_start")
    elif argv is None:
        relaunch_if_asked()
    run_cold_start(spec, args.base, parse_teacher_dirs(args.teacher, spec), args.data, args.out, not args.no_progress,
                   args.training_seed)

"""The validation sweeps (specs/sweeps/) in the tiny pipeline: a sweep point whose OPD settings are another spec's
shares that spec's seed-0 model and adds only its validation evaluation; the report then lists the validation table."""

import shlex
from pathlib import Path

from test_dvc_yaml import make_tree

from flowopd.pipeline import dvc as pipeline

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "specs/sweeps").glob("*.yaml"))


def argument(stage: dict, flag: str) -> str:
    tokens = shlex.split(stage["cmd"])
    return tokens[tokens.index(flag) + 1]


def run_by(stages: dict, spec: str) -> dict:
    """The stages a spec names in `cmd` (the first spec, in pipeline order, that has the stage)."""
    return {name: stage for name, stage in stages.items()
            if "--spec" in stage["cmd"] and argument(stage, "--spec") == spec}


def student_of(stages: dict, label: str) -> str:
    """The spec that trained the OPD model evaluated under `label`."""
    (evaluation,) = [s for s in stages.values() if "--label" in s["cmd"] and argument(s, "--label") == label]
    folder = argument(evaluation, "--model")
    (trained,) = [s for name, s in stages.items() if name.startswith("opd-") and s["outs"][0] == folder]
    return argument(trained, "--spec")


def test_the_sweeps_run_in_the_tiny_pipeline_after_the_main_spec_and_the_ablations():
    specs = pipeline.pipeline_specs(ROOT)
    assert len(SWEEPS) == 5 and specs[-len(SWEEPS):] == SWEEPS
    assert specs[0] == "specs/flow_opd.yaml"


def test_a_sweep_point_shares_the_model_of_the_spec_with_its_weight():
    stages = pipeline.build(ROOT)["stages"]
    assert student_of(stages, "sweep:mar=0.02") == "specs/flow_opd.yaml"  # the main spec's seed-0 student
    assert student_of(stages, "sweep:mar=0") == "specs/ablations/no_mar.yaml"
    assert {name.split("-")[0] for name in run_by(stages, "specs/sweeps/mar_0.02.yaml")} == {"eval"}
    assert len(run_by(stages, "specs/sweeps/mar_0.yaml")) == 1  # its validation evaluation only
    for weight in ("0.1", "0.3", "1"):  # a student of their own (one training seed) and its evaluation
        own = run_by(stages, f"specs/sweeps/mar_{weight}.yaml")
        assert sorted(name.split("-")[0] for name in own) == ["eval", "opd"], weight
        assert "--training-seed" not in next(s for n, s in own.items() if n.startswith("opd-"))["cmd"]


def test_the_report_lists_the_validation_table_only_where_a_spec_evaluates_on_val(tmp_path):
    def report_outs(stages: dict) -> set[str]:
        return {Path(next(iter(out))).name for out in stages["report"]["outs"]}

    assert set(pipeline.VALIDATION_OUTS) <= report_outs(pipeline.build(ROOT)["stages"])
    assert not set(pipeline.VALIDATION_OUTS) & report_outs(pipeline.build(ROOT, pipeline.PIPELINES[1])["stages"])
    plain = make_tree(tmp_path / "plain", no_mar="mar: {weight: 0.0}\n")
    assert not set(pipeline.VALIDATION_OUTS) & report_outs(pipeline.build(plain)["stages"])
    swept = make_tree(tmp_path / "swept", tuned="mar: {weight: 0.1}\nevaluation: {split: val}\n")
    assert set(pipeline.VALIDATION_OUTS) <= report_outs(pipeline.build(swept)["stages"])

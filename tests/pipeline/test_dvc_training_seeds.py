"""dvc.yaml with `training_seeds`: one shared data and base stage, the stages after the base once per seed, seed 0's
exactly a one-seed spec's, each seed's students descending from that seed's teachers and cold start."""

from collections import Counter
from pathlib import Path

import yaml
from test_dvc_yaml import make_tree

from flowopd.pipeline import dvc as pipeline

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ("teacher", "baseline", "cold_start", "opd")


def with_seeds(tree: Path, count: int) -> Path:
    spec = tree / "specs/flow_opd.yaml"
    spec.write_text(spec.read_text() + f"training_seeds: {count}\n")
    return tree


def by_phase(stages: dict) -> dict[str, list[str]]:
    phases = {}
    for name in stages:
        phases.setdefault(name.split("-")[0], []).append(name)
    return phases


def out(stage: dict) -> str:
    return stage["outs"][0]


def seed_of(name: str) -> int:
    """The seed a stage name carries: `teacher-text-seed2-<key>` -> 2; no tag -> 0."""
    tags = [part for part in name.split("-") if part.startswith("seed") and part[4:].isdigit()]
    return int(tags[0][4:]) if tags else 0


def test_the_shipped_pipelines_train_the_main_rows_over_three_seeds_and_the_estimator_ablations_once():
    """specs/flow_opd.yaml names three training seeds, its estimator ablations and the sweeps one (three sweep points
    train a student of their own: 0 and 0.02 are no_mar's and the main spec's seed 0); the sd3 specs one."""
    built = pipeline.build(ROOT)["stages"]
    assert Counter(seed_of(name) for name in built if name.startswith("opd-")) == {0: 10 + 3, 1: 4, 2: 4}
    assert Counter(seed_of(name) for name in built if name.startswith("teacher-")) == {0: 3, 1: 3, 2: 3}
    assert {name.split("-")[0] for name in built if seed_of(name)} == {"teacher", "baseline", "cold_start", "opd",
                                                                        "eval"}
    assert all((seed_of(name) > 0) == ("--training-seed" in stage["cmd"]) for name, stage in built.items()
               if name.startswith(TRAINED))  # an evaluation reads the seed from its model's spec.json
    sd3 = next(layout for layout in pipeline.PIPELINES if layout.dvc_yaml != pipeline.TINY.dvc_yaml)
    assert not any(seed_of(name) for name in pipeline.build(ROOT, sd3)["stages"])


def test_naming_one_training_seed_changes_nothing(tmp_path):
    tree = make_tree(tmp_path, no_mar="mar: {weight: 0.0}\n")
    before = pipeline.build(tree)
    assert pipeline.build(with_seeds(tree, 1)) == before


def test_three_seeds_repeat_every_stage_after_the_base(tmp_path):
    one = pipeline.build(make_tree(tmp_path / "one"))["stages"]
    stages = pipeline.build(with_seeds(make_tree(tmp_path / "three"), 3))["stages"]
    phases = by_phase(stages)
    assert {phase: len(names) for phase, names in phases.items()} == {
        "data": 1, "base": 1, "teacher": 9, "baseline": 3, "cold_start": 3, "opd": 3,
        "eval": 1 + 3 * 5, "ledger": 1, "report": 1}  # the base once; 3 teachers, baseline, student per seed
    assert len({out(stages[name]) for name in phases["teacher"]}) == 9  # distinct keys, distinct folders
    # seed 0 is the one-seed pipeline, stage for stage; the ledger and report read more shards
    assert {name: stage for name, stage in stages.items() if not seed_of(name)} | {
        name: one[name] for name in ("ledger", "report")} == one
    base = out(stages[phases["base"][0]])
    for name in (n for phase in TRAINED for n in phases[phase]):
        seed, stage = seed_of(name), stages[name]
        assert base in stage["deps"]  # one shared base
        assert ("--training-seed" in stage["cmd"]) == bool(seed)
        if seed:
            assert f"--training-seed {seed} " in stage["cmd"]
        if name.startswith(("cold_start", "opd")):
            teachers = {d for d in stage["deps"] if d.startswith("artifacts/teacher/")}
            assert teachers == {out(stages[n]) for n in phases["teacher"] if seed_of(n) == seed}, name
        if name.startswith("opd"):
            (cold_start,) = (out(stages[n]) for n in phases["cold_start"] if seed_of(n) == seed)
            assert cold_start in stage["deps"] and f"--init {cold_start}" in stage["cmd"]
    evaluated = {stages[name]["cmd"].split("--model ")[1].split()[0] for name in phases["eval"]}
    trained = {out(stages[n]) for phase in ("teacher", "baseline", "opd") for n in phases[phase]}
    assert evaluated == trained | {base}  # every seed's model evaluated once, with the shared evaluation settings
    assert len({name.rsplit("-", 1)[1] for name in phases["eval"]}) == 1


def test_an_ablation_shares_each_seeds_teachers(tmp_path):
    tree = with_seeds(make_tree(tmp_path, no_mar="mar: {weight: 0.0}\n"), 3)  # no_mar inherits the 3 seeds
    phases = by_phase(pipeline.build(tree)["stages"])
    assert (len(phases["teacher"]), len(phases["cold_start"]), len(phases["opd"])) == (9, 3, 6)
    assert sorted(seed_of(name) for name in phases["opd"]) == [0, 0, 1, 1, 2, 2]


def test_an_experiment_with_more_seeds_adds_stages_and_rekeys_none(tmp_path):
    from flowopd.pipeline import experiment

    tree = make_tree(tmp_path)
    pipeline.write(tree)
    before = set(yaml.safe_load((tree / "dvc.yaml").read_text())["stages"])
    experiment.apply(["specs/flow_opd.yaml:training_seeds=2"], tree)
    after = set(yaml.safe_load((tree / "dvc.yaml").read_text())["stages"])
    assert before <= after and {seed_of(name) for name in after - before} == {1}
    experiment.apply(["specs/flow_opd.yaml:training_seeds=1"], tree)  # back to one: seed 1's stages go
    assert set(yaml.safe_load((tree / "dvc.yaml").read_text())["stages"]) == before

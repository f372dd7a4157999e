"""dvc.yaml is generated from specs/: kept in sync, stages keyed by the sections their phase reads."""

import shutil
from pathlib import Path

import yaml

from flowopd.pipeline import dvc as pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_is_in_sync_with_specs():
    assert not pipeline.stale(ROOT), "dvc.yaml is stale: run `flowopd pipeline write` and commit it"


def make_tree(tmp_path, **variants: str) -> Path:
    """A repo-like tree (the code, whose imports are the stages' code dependencies), the shipped main spec with one
    training seed and extra specs given as YAML text extending it."""
    for folder in ("flowopd", "stages"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "specs/ablations").mkdir(parents=True)
    main = (ROOT / "specs/flow_opd.yaml").read_text()  # one training seed: the trees test the rules, not the count
    (tmp_path / "specs/flow_opd.yaml").write_text(
        "".join(line for line in main.splitlines(keepends=True) if not line.startswith("training_seeds:")))
    for name, body in variants.items():
        label = "" if "label:" in body else f"label: {name}\n"  # two specs never share a label
        (tmp_path / f"specs/ablations/{name}.yaml").write_text(f"extends: ../flow_opd.yaml\nname: {name}\n{label}{body}")
    return tmp_path


def stage_names(tree: Path, phase: str) -> set[str]:
    return {name for name in pipeline.build(tree)["stages"] if name.startswith(phase + "-")}


def test_specs_that_agree_on_a_phase_share_its_stage(tmp_path):
    # other_eval restates the main seed: same base sections, so it shares the base stage (run from the main spec)
    tree = make_tree(tmp_path, other_eval="seed: 0\nevaluation: {seeds: [7]}\n", other_base="base: {steps: 2311}\n")
    stages = pipeline.build(tree)["stages"]
    assert len(stage_names(tree, "data")) == 1  # no spec changes seed / world / tasks
    assert len(stage_names(tree, "base")) == 2  # other_base alone differs
    assert len(stage_names(tree, "eval-base")) == 3  # main, other_eval on the main base, other_base's base
    assert len(stage_names(tree, "teacher")) == 6  # three teachers per base
    shared = next(s for s in stages.values() if s["cmd"].startswith("python stages/base.py --spec specs/flow_opd"))
    files = {f for entry in shared["params"] for f in entry}
    assert files == {"specs/flow_opd.yaml"}  # adding a spec that shares the stage must not rerun it


def test_editing_evaluation_changes_only_eval_stages(tmp_path):
    tree = make_tree(tmp_path)
    before = pipeline.build(tree)["stages"]
    spec = tree / "specs/flow_opd.yaml"
    spec.write_text(spec.read_text().replace("seeds: [0, 1, 2]", "seeds: [0]"))
    after = pipeline.build(tree)["stages"]
    changed = set(before) ^ set(after)
    assert changed and all(name.startswith("eval-") for name in changed)


def test_editing_the_base_rekeys_base_and_everything_downstream(tmp_path):
    tree = make_tree(tmp_path)
    before = pipeline.build(tree)["stages"]
    spec = tree / "specs/flow_opd.yaml"
    text = spec.read_text()
    assert "  lr: 2.0e-3\n  warmup:" in text
    spec.write_text(text.replace("  lr: 2.0e-3\n  warmup:", "  lr: 1.0e-3\n  warmup:", 1))
    after = pipeline.build(tree)["stages"]
    assert stage_names(tree, "data") <= set(before)  # data untouched
    downstream = {n for n in after if not n.startswith("data-") and n not in ("ledger", "report")}
    assert {n.split("-")[0] for n in downstream} == {"base", "teacher", "baseline", "cold_start", "opd", "eval"}
    assert not downstream & set(before)


def test_an_ablation_reruns_only_what_it_changes(tmp_path):
    tree = make_tree(tmp_path, no_mar="label: no_mar\nmar: {weight: 0.0}\n",
                     sft="label: sft\ncold_start: {method: sft, steps: 3}\n")
    stages = pipeline.build(tree)["stages"]
    for phase, count in [("base", 1), ("teacher", 3), ("baseline", 1), ("cold_start", 2), ("opd", 3)]:
        assert len(stage_names(tree, phase)) == count, phase
    opd = {s["cmd"].split("--spec ")[1].split()[0]: s for n, s in stages.items() if n.startswith("opd-")}
    merged = opd["specs/flow_opd.yaml"]["cmd"].split("--init ")[1].split()[0]
    assert opd["specs/ablations/no_mar.yaml"]["cmd"].split("--init ")[1].split()[0] == merged  # shared cold start
    assert opd["specs/ablations/sft.yaml"]["cmd"].split("--init ")[1].split()[0] != merged
    labels = {s["cmd"].split("--label ")[1].split()[0] for n, s in stages.items() if n.startswith("eval-")}
    assert labels == {"base", "teacher:text", "teacher:objects", "teacher:quality", "mixed_grpo", "flow_opd",
                      "no_mar", "sft"}


def test_editing_one_teacher_leaves_the_others(tmp_path):
    tree = make_tree(tmp_path, text_lr="teachers: {text: {method: {lr: 2.0e-4}}}\n")
    stages = pipeline.build(tree)["stages"]
    assert len(stage_names(tree, "teacher-text")) == 2
    assert len(stage_names(tree, "teacher-objects")) == len(stage_names(tree, "teacher-quality")) == 1
    assert len(stage_names(tree, "baseline")) == 1 and len(stage_names(tree, "cold_start")) == 2
    text = next(s for s in stages.values() if s["cmd"].startswith("python stages/teacher.py --spec specs/ablations"))
    assert text["params"] == [  # its own sections only: the base's and the tasks' reach it through their folders
        {"specs/flow_opd.yaml": ["sampler", "teachers.text"]},
        {"specs/ablations/text_lr.yaml": ["teachers.text"]},
    ]


def test_params_come_from_every_file_of_the_extends_chain(tmp_path):
    tree = make_tree(tmp_path, longer="base: {steps: 2312}\n")
    stages = pipeline.build(tree)["stages"]
    base = next(s for s in stages.values() if "--spec specs/ablations/longer.yaml" in s["cmd"]
                and s["cmd"].startswith("python stages/base.py"))
    assert base["params"] == [{"specs/flow_opd.yaml": ["model", "base"]}, {"specs/ablations/longer.yaml": ["base"]}]
    rendered = yaml.safe_load(pipeline.render(tree))
    assert rendered == pipeline.build(tree)


def test_every_section_of_a_stage_key_is_some_stages_param(tmp_path):
    """A section edited without re-keying (`dvc exp run -S`) reruns the stage that owns it, which refuses."""
    tree = make_tree(tmp_path, sft="cold_start: {method: sft, steps: 3}\n")
    listed = {key.split(".")[0] for stage in pipeline.build(tree)["stages"].values()
              for entry in stage.get("params", []) for keys in entry.values() for key in keys}
    assert listed == {"seed", "world", "tasks", "model", "base", "sampler", "teachers", "baseline", "router",
                      "cold_start", "opd", "mar", "evaluation"}


def test_write_drops_the_lock_entries_of_removed_stages_and_keeps_the_rest_byte_for_byte(tmp_path):
    tree = make_tree(tmp_path)
    pipeline.write(tree)
    live = next(iter(yaml.safe_load((tree / "dvc.yaml").read_text())["stages"]))
    entry = (f"  {live}:\n    cmd: python stages/data.py --spec specs/flow_opd.yaml --out \n"
             "      artifacts/data/x\n    outs:\n    - path: artifacts/data/x\n      hash: md5\n")
    dead = "  data-0123456789:\n    cmd: python stages/data.py\n    params:\n      specs/flow_opd.yaml:\n        seed: 0\n"
    (tree / "dvc.lock").write_text("schema: '2.0'\nstages:\n" + dead + entry + dead.replace("0123", "9876"))
    pipeline.write(tree)
    assert (tree / "dvc.lock").read_text() == "schema: '2.0'\nstages:\n" + entry


def test_the_sd3_specs_make_their_own_pipeline_with_the_same_rules():
    """sd3/dvc.yaml, a DVC project of its own: stages run from the repository root and write under sd3/artifacts
    and sd3/reports, share what the three specs agree on, and the data stage depends on the prompt files; every
    path is relative to sd3/ (the code, specs and prompt files lie outside it)."""
    stages = pipeline.build(ROOT, pipeline.PIPELINES[1])["stages"]
    by_phase = {}
    for name in stages:
        by_phase.setdefault(name.split("-")[0], []).append(name)
    assert {phase: len(names) for phase, names in by_phase.items()} == {
        "data": 1, "base": 1, "teacher": 4, "baseline": 1, "cold_start": 2, "opd": 3, "eval": 9, "ledger": 1,
        "report": 1}
    (base,) = (stages[n] for n in by_phase["base"])  # the pretrained model, evaluated as the first row
    assert base["cmd"] == f"cd .. && python stages/base.py --spec specs/sd3/flow_opd.yaml --out sd3/{base['outs'][0]}"
    assert "--label base" in stages[f"eval-{by_phase['base'][0]}-" + by_phase["eval"][0].rsplit("-", 1)[1]]["cmd"]
    assert all(stage["cmd"].startswith("cd .. && python stages/") for stage in stages.values())
    outs = [o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s["outs"]]
    assert all(o.startswith(("artifacts/", "reports/")) for o in outs)
    (data,) = (stages[n] for n in by_phase["data"])
    assert "../data/sd3/ocr/train.txt" in data["deps"] and "../data/sd3/geneval/test_metadata.jsonl" in data["deps"]
    assert all(dep.startswith(("../flowopd/", "../stages/", "../data/", "artifacts/", "reports/"))
               for stage in stages.values() for dep in stage["deps"])
    teacher = stages[by_phase["teacher"][0]]
    assert teacher["cmd"].startswith("cd .. && python stages/teacher.py --spec specs/sd3/flow_opd.yaml")
    assert "--out sd3/artifacts/teacher/" in teacher["cmd"]
    assert "model" in teacher["params"][0]["../specs/sd3/flow_opd.yaml"]  # read by the teacher, not via the base
    labels = sorted(stages[n]["cmd"].split("--label ")[1].split()[0] for n in by_phase["eval"])
    assert labels == ["base", "flow_opd", "flow_opd:no_mar", "flow_opd:sft_init", "mixed_grpo", "teacher:deqa",
                      "teacher:geneval", "teacher:ocr", "teacher:pickscore"]
    assert "--db sd3/reports/ledger.duckdb" in stages["ledger"]["cmd"]
    assert "--quality-benchmark deqa" in stages["report"]["cmd"]  # the MAR anchor's task: the MAR table
    assert yaml.safe_load((ROOT / "sd3/dvc.yaml").read_text()) == pipeline.build(ROOT, pipeline.PIPELINES[1])


def label_of(stage: dict) -> str:
    tokens = stage["cmd"].split()
    return tokens[tokens.index("--label") + 1]


def test_a_later_specs_own_mixed_baseline_is_its_row_unless_it_trains_a_student_too(tmp_path):
    tree = make_tree(tmp_path, matched="label: mixed_grpo:matched\nbaseline: {method: {steps: 90}}\n",
                     both="baseline: {method: {steps: 60}}\nmar: {weight: 0.5}\n")
    stages = pipeline.build(tree)["stages"]
    labels = sorted(label_of(stage) for name, stage in stages.items() if name.startswith("eval-baseline"))
    assert labels == ["mixed_grpo", "mixed_grpo", "mixed_grpo:matched"]  # `both`'s student is its row
    assert "both" in {label_of(stage) for name, stage in stages.items() if name.startswith("eval-opd")}

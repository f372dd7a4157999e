"""`flowopd exp run -S`: spec edits that keep the file's comments, re-key dvc.yaml, and pass the rest to DVC."""

import subprocess

import pytest
import yaml
from test_dvc_yaml import make_tree

from flowopd.cli import main
from flowopd.pipeline import dvc as pipeline
from flowopd.pipeline import experiment
from flowopd.pipeline.experiment import ExperimentError, parse_assignment, set_value


def test_assignments_are_file_dotted_key_and_a_yaml_value():
    assert parse_assignment("specs/x.yaml:evaluation.seeds=[0, 1]") == ("specs/x.yaml", ["evaluation", "seeds"],
                                                                         [0, 1])
    assert parse_assignment("a.yaml:opd.lr=1e-4")[2] == 1e-4  # the spec loader's float rule
    assert parse_assignment("a.yaml:tasks.t.remote.url=http://h:1")[2] == "http://h:1"
    for bad in ("evaluation.seeds=[0]", "a.yaml:evaluation.seeds", "a.yaml:=3", "a.yaml:x..y=3", "a.yaml:x=[0"):
        with pytest.raises(ExperimentError, match=r"-S "):
            parse_assignment(bad)


def test_an_edit_keeps_comments_and_layout():
    text = ("# Run: something\nbase:   # the base\n  steps: 4\n  lr: 2.0e-3\nrouter:\n  rules:\n    - {a: 1}\n"
            "lora: null\n")
    edited = set_value(text, ["base", "steps"], 5, "x.yaml")
    assert edited == text.replace("steps: 4", "steps: 5")
    edited = set_value(text, ["opd", "sampler", "steps"], 3, "x.yaml")
    assert edited.startswith(text) and yaml.safe_load(edited)["opd"] == {"sampler": {"steps": 3}}
    with pytest.raises(ExperimentError, match="base.steps is not a mapping"):
        set_value(text, ["base", "steps", "x"], 1, "x.yaml")


def test_apply_rekeys_dvc_yaml_and_restores_every_file_on_a_bad_value(tmp_path):
    tree = make_tree(tmp_path)
    pipeline.write(tree)
    before = set(pipeline.build(tree)["stages"])
    spec = tree / "specs/flow_opd.yaml"
    original = spec.read_text()
    with pytest.raises(ExperimentError, match=r"specs/flow_opd.yaml: evaluation.seeds"):
        experiment.apply(["specs/flow_opd.yaml:evaluation.seeds=[-1]"], tree)
    assert spec.read_text() == original
    experiment.apply(["specs/flow_opd.yaml:evaluation.seeds=[0]"], tree)
    assert spec.read_text() == original.replace("seeds: [0, 1, 2]", "seeds: [0]")
    after = set(yaml.safe_load((tree / "dvc.yaml").read_text())["stages"])
    assert {n.split("-")[0] for n in before ^ after} == {"eval"}  # only the eval stages got new keys


def test_the_command_passes_other_arguments_to_dvc_exp_run(tmp_path, monkeypatch):
    tree = make_tree(tmp_path)
    monkeypatch.chdir(tree)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append(command) or
                        subprocess.CompletedProcess(command, 0))
    assert main(["exp", "run", "-S", "specs/flow_opd.yaml:mar.weight=0.0", "-n", "no-mar", "--glob", "opd-*"]) == 0
    assert calls[0][-6:] == ["exp", "run", "-n", "no-mar", "--glob", "opd-*"]
    assert "weight: 0.0" in (tree / "specs/flow_opd.yaml").read_text()

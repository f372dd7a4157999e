"""Stage commands are built from quoted tokens: whatever a spec holds, the shell that DVC runs a command in sees the
arguments `flowopd pipeline write` meant. Two specs with one name or label are refused (naming both files, before
anything is written); a spec whose stages equal another's is reported as a twin."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flowopd.pipeline import dvc as pipeline
from flowopd.pipeline.pipeline_cli import pipeline_command
from flowopd.spec import SpecError
from flowopd.spec.paths import DATA_ROOTS_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A repository with the code and the shipped main spec; no folder outside it allowed."""
    monkeypatch.delenv(DATA_ROOTS_ENV, raising=False)
    for folder in ("flowopd", "stages"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "specs/ablations").mkdir(parents=True)
    shutil.copy(ROOT / "specs/flow_opd.yaml", tmp_path / "specs/flow_opd.yaml")
    return tmp_path


def ablation(tree: Path, file: str, **fields) -> None:
    (tree / f"specs/ablations/{file}").write_text("extends: ../flow_opd.yaml\n" + yaml.safe_dump(fields))


def eval_command(stages: dict, spec_file: str) -> str:
    (cmd,) = [s["cmd"] for n, s in stages.items()  # seed 0's: the main spec trains three seeds
              if n.startswith("eval-opd-") and "-seed" not in n and spec_file in s["cmd"]]
    return cmd


def test_a_label_with_spaces_and_parentheses_is_one_argument_in_the_shell(tree):
    ablation(tree, "ours.yaml", name="ours", label="Flow-OPD (ours)", mar={"weight": 0.01})
    cmd = eval_command(pipeline.build(tree)["stages"], "ours.yaml")
    argv = shlex.split(cmd)
    assert argv[argv.index("--label") + 1] == "Flow-OPD (ours)"
    shell = subprocess.run(["bash", "-c", "python() { printf '%s\\n' \"$@\"; }; " + cmd], cwd=tree,
                           capture_output=True, text=True, check=True)
    assert shell.stdout.splitlines() == argv[1:]  # bash parses it back to the same arguments


def test_every_command_parses_back_to_its_tokens_and_shipped_commands_are_unchanged():
    for layout in pipeline.PIPELINES:
        prefix = "" if layout.project == "." else "cd .. && "  # sd3's stages run from the repository root
        for name, stage in pipeline.build(ROOT, layout)["stages"].items():
            assert stage["cmd"].startswith(prefix + "python stages/"), name
            argv = shlex.split(stage["cmd"].removeprefix(prefix))
            assert shlex.join(argv) == stage["cmd"].removeprefix(prefix), name  # plain tokens: written as before
            assert not {";", "|", "&", "&&", "`"} & set(argv), name


def test_a_hostile_label_stops_the_pipeline_before_anything_is_written(tree):
    ablation(tree, "evil.yaml", name="evil", label="x$(touch F) y; touch G #", mar={"weight": 0.03})
    with pytest.raises(SpecError, match=r"specs/ablations/evil.yaml: label: String should match pattern"):
        pipeline.write(tree)
    assert not (tree / "dvc.yaml").exists() and not (tree / "F").exists() and not (tree / "G").exists()


def test_a_spec_file_name_with_shell_syntax_is_refused(tree):
    ablation(tree, "a;b.yaml", name="ab", mar={"weight": 0.03})
    with pytest.raises(SpecError, match=r"specs/ablations/a;b.yaml: a spec file name is letters"):
        pipeline.build(tree)


@pytest.mark.parametrize("field", ["name", "label"])
def test_two_specs_with_one_name_or_label_are_an_error_naming_both(tree, capsys, monkeypatch, field):
    fields = {"name": "other", "label": "other", "mar": {"weight": 0.03}}
    ablation(tree, "other.yaml", **{**fields, field: "flow_opd"})
    monkeypatch.chdir(tree)
    assert pipeline_command(type("Args", (), {"action": "write"})) == 1
    err = capsys.readouterr().err
    assert f"specs/ablations/other.yaml: {field} 'flow_opd' is already the {field} of specs/flow_opd.yaml" in err
    assert not (tree / "dvc.yaml").exists()


def test_an_inherited_label_is_a_duplicate(tree):
    ablation(tree, "no_label.yaml", name="no_label", mar={"weight": 0.03})  # label flow_opd, from the main spec
    with pytest.raises(SpecError, match="label 'flow_opd' is already the label of specs/flow_opd.yaml"):
        pipeline.build(tree)


def test_a_twin_spec_is_a_note_naming_both(tree, capsys, monkeypatch):
    ablation(tree, "twin.yaml", name="twin", label="flow_opd:twin")  # changes nothing: its row would vanish
    monkeypatch.chdir(tree)
    assert pipeline_command(type("Args", (), {"action": "write"})) == 0
    err = capsys.readouterr().err
    assert "note: specs/ablations/twin.yaml runs the same stages as specs/flow_opd.yaml (twins)" in err
    assert (tree / "dvc.yaml").exists()

"""A spec is data: hostile spec files are refused by validation with one line naming the file, the field and the
rule, never a line of another file, and without reading outside the repository, exhausting memory or taking long.
Each test runs with the repository root at a temporary folder and no data roots allowed."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from flowopd.phases.data import run_data
from flowopd.spec import SpecError, load_spec, validate_spec
from flowopd.spec.extends import ALIAS_NODES_MAX
from flowopd.spec.paths import DATA_ROOTS_ENV, SPEC_FILE_MAX_BYTES

ROOT = Path(__file__).resolve().parents[2]
SECRET = "root:$6$hunter2:19000:0:99999:7:::"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository root holding the shipped main spec, with no folder outside it allowed; a secret file beside
    it (outside), to show that nothing of it ever reaches a message."""
    monkeypatch.delenv(DATA_ROOTS_ENV, raising=False)
    root = tmp_path / "repo"
    (root / "specs").mkdir(parents=True)
    shutil.copy(ROOT / "specs/flow_opd.yaml", root / "specs/flow_opd.yaml")
    (tmp_path / "shadow.yaml").write_text(f"{SECRET}: 1\n")
    monkeypatch.chdir(root)
    return root


def problems(path) -> str:
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert SECRET not in str(err.value) and "hunter2" not in str(err.value)
    return str(err.value)


def spec(root: Path, body: str, name: str = "x.yaml") -> Path:
    path = root / "specs" / name
    path.write_text(body if body.startswith("extends:") else "extends: flow_opd.yaml\n" + body)
    return path


def test_labels_with_shell_syntax_are_refused_naming_the_field(repo):
    for label in ["x$(touch F) y; touch G #", "a`id`", "it's", 'say "hi"', "two\nlines", "tab\there", "a" * 65]:
        found = problems(spec(repo, yaml.safe_dump({"name": "x", "label": label})))
        assert found.startswith("specs/x.yaml: label: "), label
    assert not list(repo.glob("[FG]"))


def test_a_label_with_spaces_and_parentheses_validates(repo):
    assert load_spec(spec(repo, "name: ours\nlabel: Flow-OPD (ours)\n")).label == "Flow-OPD (ours)"


def test_a_spec_cannot_take_the_label_of_a_shared_row(repo):
    for label in ("base", "mixed_grpo", "teacher:text"):
        assert "label: " in problems(spec(repo, f"name: x\nlabel: '{label}'\n"))


def test_names_are_identifiers(repo):
    found = problems(spec(repo, "name: x\nteachers: {'t; rm -rf': {task: text}}\n"))
    assert found.startswith("specs/x.yaml: teachers.t; rm -rf.[key]: String should match pattern")
    assert "name: " in problems(spec(repo, "name: '../x'\n"))
    assert "name: String should have at most 64 characters" in problems(spec(repo, f"name: {'n' * 65}\n"))


@pytest.mark.parametrize("target", ["/etc/shadow", "/dev/zero", "../../shadow.yaml", "/proc/self/environ"])
def test_extends_outside_the_repository_is_refused_without_reading_it(repo, target):
    found = problems(spec(repo, f"extends: {target}\nname: x\n", "evil.yaml"))
    assert found.startswith("specs/evil.yaml: extends: ") and len(found.splitlines()) == 1


def test_extends_through_a_symbolic_link_out_of_the_repository_is_refused(repo, tmp_path):
    (repo / "specs/link.yaml").symlink_to(tmp_path / "shadow.yaml")
    assert "outside the repository" in problems(spec(repo, "extends: link.yaml\nname: x\n", "evil.yaml"))


def test_extends_of_a_fifo_or_a_huge_file_is_refused_before_reading(repo):
    os.mkfifo(repo / "specs/fifo.yaml")  # opening it for reading would wait for a writer forever
    assert "fifo.yaml: refused: not a regular file" in problems(spec(repo, "extends: fifo.yaml\n", "a.yaml"))
    (repo / "specs/huge.yaml").write_text("# " + "x" * SPEC_FILE_MAX_BYTES + "\n")
    assert "huge.yaml: refused: larger than" in problems(spec(repo, "extends: huge.yaml\n", "b.yaml"))


def test_a_data_root_is_the_explicit_opt_in(repo, tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    shutil.copy(repo / "specs/flow_opd.yaml", tmp_path / "shared/main.yaml")
    path = spec(repo, f"extends: {tmp_path / 'shared/main.yaml'}\nname: x\n")
    assert "outside the repository" in problems(path)
    monkeypatch.setenv(DATA_ROOTS_ENV, str(tmp_path / "shared"))
    assert load_spec(path).name == "x"


def test_yaml_errors_name_the_line_not_its_text(repo):
    path = repo / "specs/broken.yaml"
    path.write_text(f"name: x\n{SECRET}\n  bad: [\n")
    found = problems(path)
    assert found.startswith("specs/broken.yaml:") and len(found.splitlines()) == 1


@pytest.mark.parametrize("field", ["train", "test"])
@pytest.mark.parametrize("target", ["../../../../etc/passwd", "/etc/shadow", "~/.ssh/id_rsa", "data/../../x.txt"])
def test_prompt_files_outside_the_repository_are_refused_by_validation(repo, field, target):
    prompts = {"kind": "file", "train": "data/train.txt", "test": "data/test.txt", field: target}
    body = yaml.safe_dump({"name": "x", "tasks": {"text": {"prompts": prompts, "reward": "ocr"}}})
    assert f"specs/x.yaml: tasks.text.prompts.{field}: " in problems(spec(repo, body))


def test_a_prompt_file_linked_out_of_the_repository_is_not_read_or_copied(repo, tmp_path):
    (repo / "data").mkdir()
    (repo / "data/train.txt").symlink_to(tmp_path / "shadow.yaml")
    (repo / "data/test.txt").write_text("a sign\n")
    prompts = {"kind": "file", "train": "data/train.txt", "test": "data/test.txt"}
    loaded = load_spec(spec(repo, yaml.safe_dump({"tasks": {"text": {"prompts": prompts, "ocr": {}}},
                                                  "name": "x", "evaluation": {"benchmarks": ["text"]}})))
    with pytest.raises(ValueError, match="refused: outside the repository") as err:
        run_data(loaded, repo / "artifacts/data/x")
    assert SECRET not in str(err.value) and not (repo / "artifacts/data/x").exists()


def test_model_folders_stay_inside_but_hub_ids_pass(repo):
    model = {"kind": "sd3", "pretrained": "stabilityai/stable-diffusion-3.5-medium"}
    assert validate_spec({**yaml.safe_load((ROOT / "specs/sd3/flow_opd.yaml").read_text()), "model": model})
    for pretrained in ("/etc", "../../models/sd3"):
        body = yaml.safe_dump({**model, "pretrained": pretrained}, default_flow_style=True)
        sd3 = repo / "specs/sd3.yaml"
        sd3.write_text(f"extends: ../sd3_main.yaml\nname: x\nmodel: {body}")
        shutil.copy(ROOT / "specs/sd3/flow_opd.yaml", repo / "sd3_main.yaml")
        assert "specs/sd3.yaml: model.pretrained: " in problems(sd3)


def test_a_mapping_alias_bomb_is_refused_before_it_expands(repo):
    lines = ["a0: &a0 {x: 1, y: 2, z: 3, w: 4, v: 5, u: 6, t: 7, s: 8, r: 9}"]
    lines += [f"a{i}: &a{i} {{{', '.join(f'b{j}: *a{i - 1}' for j in range(9))}}}" for i in range(1, 9)]
    path = repo / "specs/bomb.yaml"
    path.write_text("\n".join(lines) + "\nname: x\n")  # 9^9 mappings once expanded
    assert f"aliases expand to more than {ALIAS_NODES_MAX} extra nodes" in problems(path)
    path.write_text("a: &a [*a]\n")
    assert "aliases expand" in problems(path)


def test_the_shipped_specs_alias_far_below_the_bound():
    for path in sorted(ROOT.glob("specs/**/*.yaml")):
        load_spec(path, root=ROOT)


def test_deep_nesting_is_refused(repo):
    path = repo / "specs/deep.yaml"
    path.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested deeper than" in problems(path)


def test_many_unknown_keys_are_each_refused(repo):
    """20,000 keys: linear work (quadratic took 42 s)."""
    count = 20_000
    found = problems(spec(repo, "name: x\n" + "".join(f"k{i}: 1\n" for i in range(count))))
    lines = found.splitlines()
    assert len(lines) == count and lines[-1].startswith(f"specs/x.yaml: k{count - 1}: unknown field")


def test_whole_spec_problems_name_the_file(repo):
    """A missing section names the file asked for (it used to print one character of its path)."""
    path = repo / "specs/only.yaml"
    path.write_text("name: x\n")
    assert all(line.startswith("specs/only.yaml: ") for line in problems(path).splitlines())


def test_huge_integers_are_refused_where_libraries_need_bounds(repo):
    assert "seed: Input should be less than or equal to 4294967295" in problems(
        spec(repo, "name: x\nseed: 123456789012345678901234567890\n"))
    assert "evaluation.seeds.0: Input should be less than" in problems(
        spec(repo, "name: x\nevaluation: {seeds: [4294967296]}\n"))
    assert "base.steps: Input should be less than or equal to 2147483647" in problems(
        spec(repo, "name: x\nbase: {steps: 2147483648}\n"))
    assert problems(spec(repo, "name: x\nseed: " + "9" * 5000 + "\n")) == "specs/x.yaml: invalid YAML: ValueError"

"""Specs: shipped files, cross-field checks, extends, strict YAML, hashes, the `flowopd spec` CLI."""

import copy
import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flowopd.spec import (
    OPDSettings,
    SpecError,
    extends_chain,
    json_schema,
    load_spec,
    resolve_raw,
    spec_hash,
    validate_spec,
)
from flowopd.spec.spec_cli import main_spec, schema_text

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("**/*.yaml"))
SCHEMA = ROOT / "specs" / "schema.json"


def minimal() -> dict:
    return {
        "name": "t",
        "tasks": {
            "text": {"prompts": {"kind": "tiny", "task": "text"}, "reward": "ocr"},
            "objects": {"prompts": {"kind": "tiny", "task": "objects"}, "reward": "objects",
                        "metric": "strict"},
        },
        "teachers": {"text": {"task": "text"}, "objects": {"task": "objects"}},
        "router": {"rules": [{"task": "text", "teacher": "text"}, {"task": "objects", "teacher": "objects"}]},
        "cold_start": {"method": "merge", "weights": {"text": 1.0, "objects": 1.0}},
    }


def edited(data: dict, dotted: str, value) -> dict:
    """A deep copy of data with data[dotted path] = value (list indices as numbers)."""
    data = copy.deepcopy(data)
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    node = data
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[last] = value
    return data


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate_spec(data, "t.yaml")
    return caught.value.problems


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- shipped specs
@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_spec_validates_and_has_header(path):
    spec = load_spec(path)
    assert len(spec_hash(spec)) == 64
    lines = path.read_text().splitlines()
    relative = str(path.relative_to(ROOT))
    assert lines[0].startswith("# Run: ") and relative in lines[0], f"{relative}: line 1 gives its command"
    schema_lines = [line for line in lines[:5] if line.startswith("# yaml-language-server: $schema=")]
    assert schema_lines, f"{relative}: needs '# yaml-language-server: $schema=...' near the top"
    target = (path.parent / schema_lines[0].split("$schema=", 1)[1].strip()).resolve()
    assert target == SCHEMA.resolve()


def test_main_spec_is_the_papers_run():
    spec = load_spec(ROOT / "specs" / "flow_opd.yaml")
    assert spec.name == spec.label == "flow_opd"
    assert {name: t.task for name, t in spec.teachers.items()} == {"text": "text", "objects": "objects",
                                                                    "quality": "quality"}
    assert {name: (t.reward, t.metric) for name, t in spec.tasks.items()} == {
        "text": ("ocr", "score"), "objects": ("objects", "strict"), "quality": ("quality", "score")}
    assert spec.baseline.weights == {"text": 1.0, "objects": 1.0, "quality": 1.0}
    rules = spec.router.rules
    assert [(r.task, r.teacher) for r in rules] == [(t, t) for t in ("text", "objects", "quality")]
    assert spec.router.default == "error"
    assert spec.cold_start.method == "merge" and spec.cold_start.mode == "linear"
    assert spec.cold_start.lora_merge == "product" and len(set(spec.cold_start.weights.values())) == 1
    assert spec.opd.estimator == "sampled" and (spec.mar.anchor, spec.mar.weight) == ("quality", 0.02)
    assert spec.evaluation.seeds == (0, 1, 2) and spec.evaluation.sampler.noise_level == 0.0


def test_schema_file_is_current():
    if SCHEMA.read_text() != schema_text():
        pytest.fail("specs/schema.json is stale; regenerate: flowopd spec schema --write specs/schema.json")


def test_schema_accepts_shipped_specs_and_flags_unknown_keys():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    for path in SPECS:  # partial files (extends) included: the schema requires only kind / method
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    assert list(validator.iter_errors({"opd": {"lrr": 1.0}}))
    assert list(validator.iter_errors({"cold_start": {"method": "merge", "steps": 3}}))


# ---------------------------------------------------------------- cross-field and value checks
def test_minimal_spec_fills_defaults():
    spec = validate_spec(minimal())
    assert spec.label == "t" and spec.model.kind == "tiny"
    assert spec.evaluation.benchmarks == ("objects", "text")
    assert list(spec.tasks) == ["objects", "text"]  # mappings in key order: one hash, one loop order
    assert spec.evaluation.sampler.noise_level == 0.0 and spec.opd.sampler.noise_level == 0.7
    with pytest.raises(ValidationError):
        spec.seed = 3  # frozen


@pytest.mark.parametrize("dotted, value, expected", [
    ("teachers.text.task", "ocr", "teachers.text.task: unknown task 'ocr'"),
    ("teachers.base", {"task": "text"}, "teachers.base: 'base' is reserved"),
    ("router.rules.0.teacher", "txt", "router.rules.0.teacher: unknown teacher 'txt'"),
    ("router.rules.0.task", "words", "router.rules.0.task: unknown task 'words'"),
    ("router.rules.0", {"teacher": "text", "task": "text", "regex": "x"},
     "router.rules.0: a rule needs exactly one"),
    ("router.rules.0", {"teacher": "text"},
     "router.rules.0: a rule needs exactly one of task, keywords, regex"),
    ("router.rules.0", {"teacher": "text", "regex": "(ab"},
     "router.rules.0.regex: invalid regular expression"),
    ("router.default", "nobody", "router.default: unknown teacher 'nobody'"),
    ("router.rules", [{"task": "text", "teacher": "text"}], "router.rules: task 'objects' matches no rule"),
    ("router.rules", [], "router.rules: no rules and default \"error\""),
    ("mar.anchor", "quality", "mar.anchor: unknown anchor 'quality'"),
    ("cold_start.weights", {"text": 1.0}, "cold_start.weights: no weight for teachers 'objects'"),
    ("cold_start.weights", {"text": 1.0, "objects": 1.0, "x": 1.0},
     "cold_start.weights.x: unknown teacher 'x'"),
    ("cold_start.weights", {"text": 0.0, "objects": 0}, "cold_start.weights: all weights are zero"),
    ("cold_start.weights.text", -1.0, "cold_start.weights.text: Input should be greater than or equal to 0"),
    ("baseline", {"weights": {"text": 1.0, "ocr": 1.0}}, "baseline.weights.ocr: unknown task 'ocr'"),
    ("baseline", {"weights": {"text": 0.0}}, "baseline.weights: all weights are zero"),
    ("evaluation.benchmarks", ["text", "geneval"], "evaluation.benchmarks.1: unknown task 'geneval'"),
    ("evaluation.n_prompts", 65, "evaluation.n_prompts: 65 exceeds the test set of task 'text'"),
    ("tasks.objects.metric", "exact", "tasks.objects: reward 'objects' has no metric 'exact'"),
    ("model", {"kind": "tiny", "patch_size": 5},
     "model.patch_size: patch_size 5 does not divide world.canvas"),
    ("model", {"kind": "sd3", "pretrained": "x", "resolution": 500},
     "model.resolution: must be a multiple of 16"),
    ("base.cfg_dropout", 1.5, "base.cfg_dropout: Input should be less than or equal to 1"),
    ("base.label_noise", {"text": 2.0}, "base.label_noise.text: Input should be less than or equal to 1"),
    ("base.flaws", {"noise": 0.7, "blur": 0.5}, "base.flaws: flaw shares sum to 1.2 > 1"),
    ("opd.timestep_fraction", 0.0, "opd.timestep_fraction: Input should be greater than 0"),
    ("opd.steps", 0, "opd.steps: Input should be greater than 0"),
    ("opd.steps", True, "opd.steps: Input should be a valid integer"),
    ("teachers.text.method", {"kind": "grpo", "group_size": 1},
     "teachers.text.method.group_size: Input should be greater than or equal to 2"),
    ("teachers.text.method", {"kind": "grpo", "clip_eps": 0.0}, "teachers.text.method.clip_eps: Input should be greater than 0"),
    ("evaluation.seeds", [0, 0], "evaluation.seeds: repeated entries: 0"),
    ("sampler.cfg", math.nan, "sampler.cfg: Input should be a finite number"),
    ("opd.lr", math.inf, "opd.lr: Input should be a finite number"),
    ("cold_start.weights.text", math.inf, "cold_start.weights.text: Input should be a finite number"),
    ("teachers.text.method", {"kind": "grpo", "sampler": {"shift": -math.inf}},
     "teachers.text.method.sampler.shift: Input should be a finite number"),
    ("opd", {"estimator": "sampled", "sampler": {"noise_level": 0.0}},
     "opd: estimator sampled needs the SDE sampler (sampler.noise_level > 0)"),
    ("opd", {"estimator": "analytic_grad", "query": {"steps": [5, 9]}},
     "opd: query applies to estimator velocity_mse, not analytic_grad"),
    ("opd", {"estimator": "velocity_mse", "query": {"steps": [5, 10]}},
     "opd: query.steps [5, 10] reaches past the sampler's last step 9"),
    ("opd", {"estimator": "velocity_mse", "query": {"steps": [6, 5]}},
     "opd.query.steps: first step 6 is after last step 5"),
    ("opd", {"estimator": "velocity_mse", "query": {"draw": "normal"}},
     "opd.query.draw: Input should be 'uniform' or 'beta'"),
    ("opd.estimator", "dance", "opd.estimator: Input should be"),
])
def test_check_names_field_and_problem(dotted, value, expected):
    found = problems(edited(minimal(), dotted, value))
    assert any(line.startswith(f"t.yaml: {expected}") for line in found), found


@pytest.mark.parametrize("dotted, value", [
    ("router.default", "base"),
    ("router.default", "objects"),
    ("router.rules", [{"keywords": ["sign"], "teacher": "text"}]),  # keywords: coverage cannot be checked
    ("mar.anchor", "base"),
    ("mar.anchor", "objects"),
    ("cold_start.weights", {"text": 0.0, "objects": 2.0}),
    ("baseline", {"weights": {"objects": 1.0}}),
    ("base.lr", 1),  # an int where a float goes
    ("opd", {"estimator": "diffusion_opd", "sampler": {"noise_level": 0.0}}),
    ("opd", {"estimator": "velocity_mse", "sampler": {"noise_level": 0.0}, "query": {"steps": [0, 9], "draw": "beta"}}),
])
def test_valid_variants_pass(dotted, value):
    validate_spec(edited(minimal(), dotted, value))


def test_unknown_keys_are_named_with_a_suggestion():
    data = edited(edited(minimal(), "opd.lrr", 1.0), "colour", "red")
    data["cold_start"]["mdoe"] = "linear"
    found = problems(data)
    assert "t.yaml: opd.lrr: unknown field 'lrr'; did you mean 'lr'?" in found
    assert "t.yaml: cold_start.mdoe: unknown field 'mdoe'; did you mean 'mode'?" in found  # no union tag
    assert any(line.startswith("t.yaml: colour: unknown field 'colour'") for line in found)


def test_union_problems_show_plain_paths():
    found = problems(edited(minimal(), "tasks.text.prompts", {"kind": "tiny", "task": "text", "n_test": 0}))
    assert found == ["t.yaml: tasks.text.prompts.n_test: Input should be greater than 0 (got 0)"]
    found = problems(edited(minimal(), "cold_start", {"method": "average"}))
    assert found == ["t.yaml: cold_start: unknown 'method' 'average'; expected one of 'merge', 'sft', 'none'"]


# ---------------------------------------------------------------- YAML
def test_duplicate_keys_refused_with_position(tmp_path):
    path = write(tmp_path, "dup.yaml", """\
        name: t
        opd:
          steps: 3
          steps: 4
        """)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.problems == [f"{path}:4:3: duplicate key 'steps' (first defined at line 3)"]


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "bad.yaml", "name: t\nseeds: [0, 1\nopd: {}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    (line,) = caught.value.problems
    assert line.startswith(f"{path}:3:4: ")


def test_yaml_is_safe_and_reads_exponent_floats(tmp_path):
    path = write(tmp_path, "obj.yaml", "name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(SpecError, match="obj.yaml:1:7: "):
        load_spec(path)
    data = edited(minimal(), "opd.lr", "placeholder")
    path = write(tmp_path, "exp.yaml", yaml.safe_dump(data).replace("placeholder", "1e-3"))
    assert load_spec(path).opd.lr == 1e-3


@pytest.mark.parametrize("text, message", [("- 1\n- 2\n", "got a list"), ("", "got an empty file"),
                                           ("just words\n", "got a str")])
def test_non_mapping_file_refused(tmp_path, text, message):
    path = write(tmp_path, "x.yaml", text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.problems == [f"{path}: a spec must be a YAML mapping, {message}"]


# ---------------------------------------------------------------- extends
def test_extends_deep_merges_relative_to_the_file(tmp_path):
    base = {**minimal(), "evaluation": {"seeds": [0, 1, 2], "grid_size": 4}}
    write(tmp_path, "base.yaml", yaml.safe_dump(base))
    write(tmp_path, "mid/ablation.yaml", """\
        extends: ../base.yaml
        tasks:
          text: {prompts: {n_test: 8}}
        evaluation: {seeds: [5]}
        cold_start: {method: sft, steps: 7}
        """)
    leaf = write(tmp_path, "mid/deeper/leaf.yaml", "extends: ../ablation.yaml\nname: leaf\n")
    raw = resolve_raw(leaf)
    assert "extends" not in raw and raw["name"] == "leaf"
    assert raw["tasks"]["text"] == {"prompts": {"kind": "tiny", "task": "text", "n_test": 8}, "reward": "ocr"}
    assert raw["evaluation"] == {"seeds": [5], "grid_size": 4}  # lists replace, siblings stay
    assert raw["cold_start"] == {"method": "sft", "steps": 7}  # a changed method replaces the mapping
    spec = load_spec(leaf)
    assert spec.cold_start.steps == 7 and spec.tasks["text"].prompts.n_test == 8
    chain = extends_chain(leaf)  # root first, each file's own keys
    assert [p.resolve() for p, _ in chain] == [(tmp_path / f).resolve() for f in
                                               ("base.yaml", "mid/ablation.yaml", "mid/deeper/leaf.yaml")]
    assert chain[-1][1] == {"name": "leaf"} and set(chain[1][1]) == {"tasks", "evaluation", "cold_start"}


def test_extends_problems_name_the_file_that_set_the_value(tmp_path):
    write(tmp_path, "base.yaml", yaml.safe_dump(edited(minimal(), "opd.lr", -1.0)))
    child = write(tmp_path, "sub/child.yaml", "extends: ../base.yaml\nmar: {weight: -2.0}\n")
    found = load_problems(child)
    assert f"{tmp_path / 'base.yaml'}: opd.lr: Input should be greater than 0 (got -1.0)" in found
    assert f"{child}: mar.weight: Input should be greater than or equal to 0 (got -2.0)" in found


def load_problems(path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return caught.value.problems


def test_extends_cycle_refused(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: sub/b.yaml\nname: a\n")
    write(tmp_path, "sub/b.yaml", "extends: ../a.yaml\n")
    (line,) = load_problems(a)
    assert "extends cycle" in line and "a.yaml -> " in line and "b.yaml" in line
    me = write(tmp_path, "self.yaml", "extends: self.yaml\n")
    assert "extends cycle" in load_problems(me)[0]


def test_extends_missing_file_and_bad_value_refused(tmp_path):
    path = write(tmp_path, "c.yaml", "extends: nowhere.yaml\n")
    assert load_problems(path) == [f"{path}: extends: file not found: {tmp_path / 'nowhere.yaml'}"]
    path = write(tmp_path, "d.yaml", "extends: [a.yaml]\n")
    assert "extends: must be a path" in load_problems(path)[0]
    assert load_problems(tmp_path / "absent.yaml") == [f"{tmp_path / 'absent.yaml'}: file not found"]


# ---------------------------------------------------------------- hashes
def test_hash_ignores_order_comments_format_and_extends(tmp_path):
    data = edited(minimal(), "opd.steps", 12)
    flat = write(tmp_path, "flat.yaml", yaml.safe_dump(data, sort_keys=True))
    reordered = write(tmp_path, "reordered.yaml", "# a comment\n" + yaml.safe_dump(
        dict(reversed(list(data.items()))), sort_keys=False, default_flow_style=True, width=40))
    write(tmp_path, "parent.yaml", yaml.safe_dump(minimal()))
    child = write(tmp_path, "child.yaml", "extends: parent.yaml  # inherits all\nopd:\n  steps: 12\n")
    hashes = {spec_hash(load_spec(p)) for p in (flat, reordered, child)}
    assert len(hashes) == 1
    spec = load_spec(flat)
    expected = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()
    assert hashes == {expected}
    assert spec_hash(validate_spec(edited(data, "opd.steps", 13))) != expected
    assert spec_hash(validate_spec(edited(data, "base.lr", 1e-3 + 1e-12))) != expected


def test_explicit_defaults_hash_like_omitted_ones():
    explicit = edited(minimal(), "sampler", {"steps": 10, "shift": 3.0, "noise_level": 0.7, "cfg": 3.0})
    explicit["label"] = "t"
    explicit["evaluation"] = {"benchmarks": ["objects", "text"]}
    assert spec_hash(validate_spec(explicit)) == spec_hash(validate_spec(minimal()))


def test_section_hash_keys_only_on_the_named_sections():
    spec = validate_spec(minimal())
    other = validate_spec(edited(minimal(), "evaluation.seeds", [7]))
    assert spec.section_hash("tasks", "teachers") == other.section_hash("teachers", "tasks")
    assert spec.section_hash("evaluation") != other.section_hash("evaluation")
    assert spec.section_hash("opd") != spec.section_hash("mar")
    assert spec_hash(spec) != spec_hash(other)
    with pytest.raises(KeyError):
        spec.section_hash("nope")


def test_phases_inherit_the_top_level_sampler():
    data = edited(edited(minimal(), "sampler", {"cfg": 4.5, "steps": 12}), "opd.sampler", {"steps": 6})
    data["cold_start"] = {"method": "sft"}
    spec = validate_spec(data)
    assert (spec.teachers["text"].method.sampler.cfg, spec.teachers["text"].method.sampler.steps) == (4.5, 12)
    assert (spec.opd.sampler.cfg, spec.opd.sampler.steps) == (4.5, 6)
    assert spec.cold_start.sampler.cfg == 4.5
    assert (spec.evaluation.sampler.cfg, spec.evaluation.sampler.steps) == (3.0, 20)  # evaluation is its own


# ---------------------------------------------------------------- CLI (a subprocess each: what users run)
def flowopd(*args, cwd=ROOT):
    command = [sys.executable, "-m", "flowopd", "spec", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_cli_validate_ok_and_problems(tmp_path):
    bad_data = edited(edited(minimal(), "opd.lr", -1.0), "mar.anchor", "x")
    bad = write(tmp_path, "bad.yaml", yaml.safe_dump(bad_data))
    dup = write(tmp_path, "dup.yaml", "a: 1\na: 2\n")
    result = flowopd("validate", "specs/flow_opd.yaml", bad, dup)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    good_hash = spec_hash(load_spec(ROOT / "specs" / "flow_opd.yaml"))
    assert lines[0] == f"ok specs/flow_opd.yaml {good_hash[:12]}"
    assert lines[1:] == [f"{bad}: opd.lr: Input should be greater than 0 (got -1.0)",
                         f"{dup}:2:1: duplicate key 'a' (first defined at line 1)"]
    assert flowopd("validate", "specs/flow_opd.yaml").returncode == 0


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """In-process `flowopd spec ...` (subprocesses above cover the real entry point)."""
    code = main_spec([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_show_hash_schema(tmp_path, capsys):
    code, shown, _ = run_cli(capsys, "show", ROOT / "specs/ablations/no_mar.yaml")
    assert code == 0
    flat = write(tmp_path, "flat.yaml", shown)
    expected = spec_hash(load_spec(ROOT / "specs/ablations/no_mar.yaml"))
    assert spec_hash(load_spec(flat)) == expected and "extends" not in resolve_raw(flat)
    assert run_cli(capsys, "hash", flat)[1].strip() == expected
    teachers = validate_spec(yaml.safe_load(shown)).section_hash("teachers", "tasks")
    assert run_cli(capsys, "hash", flat, "--section", "teachers", "--section", "tasks")[1].strip() == teachers
    assert json.loads(run_cli(capsys, "schema")[1]) == json_schema()
    assert run_cli(capsys, "schema", "--check", SCHEMA)[0] == 0
    code, _, err = run_cli(capsys, "schema", "--check", write(tmp_path, "stale.json", "{}\n"))
    assert code == 1 and "flowopd spec schema --write" in err
    code, _, err = run_cli(capsys, "hash", flat, "--section", "nope")
    assert code == 1 and "unknown sections" in err


def test_cli_bad_input_exits_1_without_traceback(tmp_path, capsys):
    paths = [tmp_path / "missing.yaml", tmp_path, write(tmp_path, "x.yaml", "a: [\n")]
    result = flowopd("validate", *paths)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(p) for p in paths]
    for command in ("show", "hash"):
        for path in paths:
            code, out, err = run_cli(capsys, command, path)
            assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith(str(path))


def test_spec_cli_imports_nothing_heavy():
    heavy = ("torch", "diffusers", "transformers", "numpy", "polars")
    code = f"import sys, flowopd.spec.spec_cli; print([m for m in {heavy} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_an_unset_opd_query_is_left_out_of_the_hash():
    """Specs written before `opd.query` existed keep their hash (and their stage keys)."""
    assert "query" not in OPDSettings().model_dump(mode="json")
    queried = OPDSettings(estimator="velocity_mse", sampler={"noise_level": 0.0}, query={"steps": [5, 9]})
    assert queried.model_dump(mode="json")["query"] == {"steps": [5, 9], "draw": "uniform"}


# ---------------------------------------------------------------- validation split
def file_task_spec(split: str, **prompts) -> dict:
    """minimal() with task `text` read from files (the scene reader scores them)."""
    text = {"prompts": {"kind": "file", "train": "a.txt", "test": "b.txt", **prompts}, "reward": "ocr", "ocr": {}}
    return edited(edited(minimal(), "tasks.text", text), "evaluation.split", split)


def test_validation_split_defaults():
    spec = validate_spec(minimal())
    assert spec.tasks["text"].prompts.n_val == 64 and spec.evaluation.split == "test"


def test_n_prompts_is_checked_against_the_split_evaluated():
    bigger_val = edited(edited(minimal(), "tasks.text.prompts.n_val", 100), "tasks.objects.prompts.n_val", 100)
    validate_spec(edited(edited(bigger_val, "evaluation.split", "val"), "evaluation.n_prompts", 65))
    found = problems(edited(bigger_val, "evaluation.n_prompts", 65))  # split test: n_test 64 still bounds it
    assert "t.yaml: evaluation.n_prompts: 65 exceeds the test set of task 'text' (n_test 64)" in found
    bigger_test = edited(edited(minimal(), "tasks.text.prompts.n_test", 100), "evaluation.split", "val")
    found = problems(edited(bigger_test, "evaluation.n_prompts", 65))
    assert "t.yaml: evaluation.n_prompts: 65 exceeds the val set of task 'text' (n_val 64)" in found


@pytest.mark.parametrize("dotted, value, expected", [
    ("tasks.text.prompts.n_val", 0, "tasks.text.prompts.n_val: Input should be greater than 0"),
    ("tasks.text.prompts.n_val", True, "tasks.text.prompts.n_val: Input should be a valid integer"),
    ("evaluation.split", "train", "evaluation.split: Input should be 'val' or 'test'"),
])
def test_validation_fields_are_checked(dotted, value, expected):
    found = problems(edited(minimal(), dotted, value))
    assert any(line.startswith(f"t.yaml: {expected}") for line in found), found


def test_val_evaluation_refused_for_a_file_task_without_val():
    found = problems(file_task_spec("val"))
    message = "evaluation.split: task 'text' has no validation prompts (its prompts give no `val` file)"
    assert found == [f"t.yaml: {message}"]
    spec = validate_spec(file_task_spec("val", val="c.txt"))
    assert spec.tasks["text"].prompts.val == "c.txt" and spec.evaluation.split == "val"
    validate_spec(file_task_spec("test"))  # a test evaluation needs no val file
    found = problems(file_task_spec("test", val="../c.txt"))
    assert any(line.startswith("t.yaml: tasks.text.prompts.val: ") for line in found), found


def test_default_split_and_absent_val_are_left_out_of_the_hash():
    """Specs written before the validation split keep their hash (sd3 specs: their stage keys too)."""
    assert spec_hash(validate_spec(edited(minimal(), "evaluation.split", "test"))) == spec_hash(validate_spec(minimal()))
    assert spec_hash(validate_spec(edited(minimal(), "evaluation.split", "val"))) != spec_hash(validate_spec(minimal()))
    dumped = validate_spec(file_task_spec("test")).model_dump(mode="json")
    assert "val" not in dumped["tasks"]["text"]["prompts"] and "split" not in dumped["evaluation"]
    dumped = validate_spec(file_task_spec("val", val="c.txt")).model_dump(mode="json")
    assert dumped["tasks"]["text"]["prompts"]["val"] == "c.txt" and dumped["evaluation"]["split"] == "val"
    micro = validate_spec(edited(minimal(), "evaluation.micro_batch", 8)).model_dump(mode="json")["evaluation"]
    assert micro["micro_batch"] == 8 and "decode_batch" not in micro  # memory defaults still left out

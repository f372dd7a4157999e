"""Cold start: merges by hand (linear, task arithmetic, TIES, LoRA product vs factors), and the phase's artifacts."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd.methods.merge import fold_delta, lora_delta, merge_lora, merge_states
from flowopd.methods.pretrain import tiny_model_config
from flowopd.methods.sft import best_of_groups, teacher_samples
from flowopd.models.tiny import TinyBundle
from flowopd.phases.cold_start import main as stage_main
from flowopd.phases.cold_start import run_cold_start
from flowopd.phases.data import run_data
from flowopd.phases.keys import cold_start_sub_spec
from flowopd.runtime.artifacts import atomic_folder, write_provenance
from flowopd.spec import SamplerSettings, load_spec, resolve_raw, validate_spec
from flowopd.world.grammar import text_prompt

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "data" / "micro.yaml"
TEACHERS = ("objects", "quality", "text")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def micro_spec(cold_start: dict):
    raw = resolve_raw(MICRO)
    raw["cold_start"] = cold_start  # replaces the inherited method's fields
    return validate_spec(raw)


# ---------------------------------------------------------------- merges by hand
def test_linear_merge_of_identical_teachers_is_that_teacher():
    teacher = {"w": torch.randn(4, 3), "b": torch.randn(3), "steps": torch.tensor([7])}
    merged = merge_states(None, [teacher, teacher, teacher], [1.0, 2.0, 0.5])
    assert all(torch.equal(merged[k], teacher[k]) for k in teacher)


def test_linear_merge_normalises_the_weights():
    merged = merge_states(None, [{"w": t(1, 2)}, {"w": t(3, 6)}], [1.0, 3.0])
    torch.testing.assert_close(merged["w"], t(2.5, 5.0))  # 0.25 a + 0.75 b
    with pytest.raises(ValueError, match="scale must be 1"):
        merge_states(None, [{"w": t(1)}], [1.0], scale=2.0)


def test_task_arithmetic_by_hand():
    base = {"w": t(1, 1, 1)}
    teachers = [{"w": t(2, 1, 0)}, {"w": t(1, 3, 1)}]  # task vectors (1, 0, -1) and (0, 2, 0)
    merged = merge_states(base, teachers, [1.0, 0.5], "task_arithmetic", scale=2.0)
    torch.testing.assert_close(merged["w"], t(3, 3, -1))  # 1 + 2 * (1, 1, -1)


def test_ties_by_hand():
    base = {"w": t(1, 1, 1, 1)}
    taus = [t(3, -1, 0.5, -2), t(-4.5, 2, 1, -4), t(2, -0.1, -3, 1)]
    teachers = [{"w": base["w"] + tau} for tau in taus]
    # density 0.5 keeps 2 of 4 entries: (3, 0, 0, -2), (-4.5, 0, 0, -4), (2, 0, -3, 0); sum (0.5, 0, -3, -6)
    # elects signs (+, 0, -, -); disjoint means (3 + 2) / 2, nothing, -3, (-2 - 4) / 2.
    merged = merge_states(base, teachers, [1.0, 1.0, 1.0], "ties", density=0.5)
    torch.testing.assert_close(merged["w"], base["w"] + t(2.5, 0, -3, -3))
    # Weights enter the election and the mean: w = (1, 2, 1) elects "-" at entry 0 (3 - 9 + 2 < 0).
    weighted = merge_states(base, teachers, [1.0, 2.0, 1.0], "ties", density=0.5, scale=2.0)
    torch.testing.assert_close(weighted["w"], base["w"] + 2 * t(-4.5, 0, -3, -10 / 3))


def test_merge_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="other keys"):
        merge_states(None, [{"a": t(1)}, {"b": t(1)}], [1, 1])
    with pytest.raises(ValueError, match="pass the base"):
        merge_states(None, [{"a": t(1)}], [1], "ties")
    with pytest.raises(ValueError, match="merge mode"):
        merge_states(None, [{"a": t(1)}], [1], "average")


# ---------------------------------------------------------------- LoRA: products vs factors
LORA = [
    {"blocks.0.to_q.lora_A.weight": t(1, 0)[None], "blocks.0.to_q.lora_B.weight": t(1, 0)[:, None]},
    {"blocks.0.to_q.lora_A.weight": t(0, 1)[None], "blocks.0.to_q.lora_B.weight": t(0, 1)[:, None]},
]


def test_lora_product_merge_averages_the_products_and_factors_do_not():
    product = merge_lora(LORA, [1.0, 1.0], lora_merge="product", scaling=2.0)
    expected = (lora_delta(LORA[0], 2.0)["blocks.0.to_q.weight"] + lora_delta(LORA[1], 2.0)["blocks.0.to_q.weight"]) / 2
    torch.testing.assert_close(product["blocks.0.to_q.weight"], expected)
    torch.testing.assert_close(expected, torch.eye(2))  # 2 * mean(diag(1, 0), diag(0, 1))
    factors = merge_lora(LORA, [1.0, 1.0], lora_merge="factors", scaling=2.0)
    torch.testing.assert_close(factors["blocks.0.to_q.weight"], torch.full((2, 2), 0.5))  # 2 * (.5, .5)^T (.5, .5)
    summed = merge_lora(LORA, [1.0, 1.0], "task_arithmetic", lora_merge="product")
    torch.testing.assert_close(summed["blocks.0.to_q.weight"], torch.eye(2))
    base = {"blocks.0.to_q.weight": torch.ones(2, 2), "blocks.0.to_q.bias": torch.zeros(2)}
    folded = fold_delta(base, product)
    torch.testing.assert_close(folded["blocks.0.to_q.weight"], torch.ones(2, 2) + torch.eye(2))
    assert torch.equal(folded["blocks.0.to_q.bias"], base["blocks.0.to_q.bias"])
    with pytest.raises(ValueError, match="one alpha / rank"):
        merge_lora(LORA, [1.0, 1.0], lora_merge="factors", scaling=[1.0, 2.0])
    with pytest.raises(ValueError, match="not a LoRA factor"):
        lora_delta({"blocks.0.to_q.weight": torch.eye(2)}, 1.0)


def test_best_of_groups_picks_each_groups_argmax():
    assert best_of_groups([0.1, 0.9, 0.5, 0.5, 0.2, 0.1], 2).tolist() == [1, 2, 4]


# ---------------------------------------------------------------- sub-specs
def test_sub_spec_follows_the_method():
    none = micro_spec({"method": "none"})
    assert cold_start_sub_spec(none) == none.sections("seed", "world", "model", "base")
    merge = load_spec(MICRO)
    data = cold_start_sub_spec(merge)
    assert {"seed", "world", "model", "base", "teachers", "cold_start"} <= set(data) and "tasks" not in data
    assert set(data["teachers"]) == set(TEACHERS) and data["cold_start"]["method"] == "merge"
    sft = micro_spec({"method": "sft"})
    assert {"router", "tasks"} <= set(cold_start_sub_spec(sft))
    json.dumps(cold_start_sub_spec(sft))


# ---------------------------------------------------------------- the phase on the micro spec
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Data, a random micro base, and three teachers = the base with perturbed transformer weights."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cold_start")
    spec = load_spec(MICRO)
    run_data(spec, root / "data")
    torch.manual_seed(0)
    base = TinyBundle(tiny_model_config(spec)).eval()
    save_artifact(base, root / "base")
    for i, name in enumerate(TEACHERS):
        teacher = TinyBundle.load(root / "base")
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in teacher.transformer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        save_artifact(teacher, root / name)
    return root


def save_artifact(bundle, folder):
    """A model folder as a phase writes it: the weights and a meta.json recording every file's sha256."""
    with atomic_folder(folder) as staging:
        bundle.save(staging)
        write_provenance(staging, "base", {})


def teacher_dirs(root):
    return {name: root / name for name in TEACHERS}


def test_merge_writes_the_merged_student(inputs, tmp_path):
    spec = micro_spec({"method": "merge", "mode": "linear", "weights": {"text": 1.0, "objects": 1.0, "quality": 2.0}})
    run_cold_start(spec, inputs / "base", teacher_dirs(inputs), None, tmp_path / "student", progress=False)
    out = tmp_path / "student"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model_config.json", "meta.json", "spec.json"}
    student, base = load_file(out / "model.safetensors"), load_file(inputs / "base" / "model.safetensors")
    teachers = {n: load_file(inputs / n / "model.safetensors") for n in TEACHERS}
    for key, value in student.items():
        expected = (teachers["text"][key] + teachers["objects"][key] + 2 * teachers["quality"][key]) / 4
        torch.testing.assert_close(value, expected)
        if key.startswith("text_encoder."):
            assert torch.equal(value, base[key])  # frozen in every teacher: bit-exact
    meta = json.loads((out / "meta.json").read_text())
    assert meta["phase"] == "cold_start" and meta["method"] == "merge" and set(meta["teachers"]) == set(TEACHERS)
    assert json.loads((out / "spec.json").read_text()) == cold_start_sub_spec(spec)
    TinyBundle.load(out)


def test_ties_merge_phase_and_missing_teacher(inputs, tmp_path):
    spec = micro_spec({"method": "merge", "mode": "ties", "ties_density": 0.5, "weights": dict.fromkeys(TEACHERS, 1.0)})
    with pytest.raises(SystemExit, match="pass --teacher quality=DIR --teacher text=DIR"):
        run_cold_start(spec, inputs / "base", {"objects": inputs / "objects"}, None, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    run_cold_start(spec, inputs / "base", teacher_dirs(inputs), None, tmp_path / "ties", progress=False)
    student, base = load_file(tmp_path / "ties" / "model.safetensors"), load_file(inputs / "base" / "model.safetensors")
    key = next(k for k in student if k.startswith("transformer.") and student[k].numel() > 100)
    changed = (student[key] != base[key]).float().mean().item()
    assert 0.3 < changed < 1.0  # trimmed to half of each task vector; only some entries move


def test_none_copies_the_base_through_the_command_line(inputs, tmp_path):
    spec_file = tmp_path / "none.yaml"
    spec_file.write_text(f"extends: {MICRO}\ncold_start: {{method: none}}\n")
    stage_main(["--spec", str(spec_file), "--base", str(inputs / "base"), "--out", str(tmp_path / "none"),
                "--no-progress"])
    student, base = load_file(tmp_path / "none" / "model.safetensors"), load_file(inputs / "base" / "model.safetensors")
    assert student.keys() == base.keys() and all(torch.equal(student[k], base[k]) for k in base)
    with pytest.raises(SystemExit, match="NAME=DIR"):
        stage_main(["--spec", str(spec_file), "--teacher", "text", "--out", str(tmp_path / "z")])
    with pytest.raises(SystemExit, match="unknown teacher"):
        stage_main(["--spec", str(spec_file), "--teacher", "ocr=x", "--out", str(tmp_path / "z")])


def test_teacher_samples_are_routed_and_seeded(inputs):
    teachers = {name: TinyBundle.load(inputs / name) for name in ("text", "quality")}
    prompts = [text_prompt("KO"), text_prompt("AX"), text_prompt("TE")]
    sampler = SamplerSettings(steps=2, noise_level=0.0)
    x = teacher_samples(teachers, prompts, ["text", "quality", "text"], sampler, 2, seed=0, progress=False)
    assert x.shape == (6, 3, 32, 32)
    again = teacher_samples(teachers, prompts, ["text", "quality", "text"], sampler, 2, seed=0, progress=False)
    assert torch.equal(x, again)
    alone = teacher_samples({"quality": teachers["quality"]}, prompts[1:2], ["quality"], sampler, 2, seed=0,
                            progress=False)
    assert torch.equal(alone, x[2:4])  # a teacher's stream is its own: the other teachers do not change it
    with pytest.raises(ValueError, match="objects"):
        teacher_samples(teachers, prompts[:1], ["objects"], sampler, 1, seed=0, progress=False)


def test_sft_fine_tunes_the_base_on_the_best_teacher_samples(inputs, tmp_path):
    spec = micro_spec({"method": "sft", "steps": 3, "batch_size": 4, "samples_per_prompt": 2, "best_of_group": True,
                       "sampler": {"steps": 3}})
    outs = [tmp_path / "sft", tmp_path / "sft_again"]
    for out in outs:
        run_cold_start(spec, inputs / "base", teacher_dirs(inputs), inputs / "data", out, progress=False)
    student, base = load_file(outs[0] / "model.safetensors"), load_file(inputs / "base" / "model.safetensors")
    assert any(not torch.equal(student[k], base[k]) for k in base if k.startswith("transformer."))
    assert all(torch.equal(student[k], base[k]) for k in base if k.startswith("text_encoder."))
    again = load_file(outs[1] / "model.safetensors")
    assert all(torch.equal(student[k], again[k]) for k in student)  # deterministic from spec.seed
    meta = json.loads((outs[0] / "meta.json").read_text())
    assert meta["routing"] == {"objects": 8, "quality": 8, "text": 8} and meta["samples"] == 24
    assert len((outs[0] / "curve.csv").read_text().splitlines()) == 1 + 3


def test_sd3_cold_starts_stop_with_a_clear_message(tmp_path):
    specs = Path(__file__).parents[2] / "specs" / "sd3"
    with pytest.raises(SystemExit, match="'geneval', 'ocr', 'pickscore' are needed: pass --teacher deqa=DIR --teacher"):
        run_cold_start(load_spec(specs / "flow_opd.yaml"), None, {}, None, tmp_path / "out", progress=False)
    with pytest.raises(SystemExit, match="an sft cold start samples the train prompts: pass --data"):
        run_cold_start(load_spec(specs / "sft_init.yaml"), None, {}, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

"""Cold start, OPD and evaluation of an sd3 spec on a tiny random SD3 pipeline saved as a local folder (offline):
the teachers, the MAR anchor and the student are LoRA adapters on ONE frozen base transformer.

Run: pytest tests/phases/test_sd3_phases.py
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_sd3 import RESOLUTION, tiny_sd3_bundle

from flowopd.methods.merge import fold_delta, lora_delta, merge_lora, merged_adapter
from flowopd.methods.opd_trainer import OPDTrainer
from flowopd.models.sd3 import SD3Bundle, read_adapter, write_adapter
from flowopd.phases.cold_start import run_cold_start
from flowopd.phases.data import run_data
from flowopd.phases.eval import run_eval
from flowopd.phases.opd import run_opd, sd3_models
from flowopd.runtime.artifacts import atomic_folder, write_provenance
from flowopd.spec import LoraSettings, load_spec
from flowopd.train.policy import ADAPTER

LORA = {"rank": 2, "alpha": 4.0}


def random_adapter(rank: int, seed: int) -> dict:
    """An adapter state dict for the tiny SD3's attention projections: in -> out dims of 16."""
    generator = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.attn.to_q.lora_{f}.weight": torch.randn(shape, generator=generator)
            for i in range(2) for f, shape in (("A", (rank, 16)), ("B", (16, rank)))}


@pytest.mark.parametrize("mode", ["linear", "task_arithmetic"])
def test_a_concatenated_adapter_is_exactly_the_product_merge(mode):
    adapters, ranks, alphas, weights = [random_adapter(2, 0), random_adapter(3, 1)], [2, 3], [4.0, 3.0], [1.0, 3.0]
    configs = [{"rank": r, "alpha": a, "target_modules": ["attn.to_q"], "dropout": 0.0} for r, a in zip(ranks, alphas)]
    scale = 1.0 if mode == "linear" else 0.5
    state, config = merged_adapter(adapters, configs, weights, mode, scale=scale)
    assert config["rank"] == 5 and config["alpha"] == 5.0
    expected = merge_lora(adapters, weights, mode, scale=scale, scaling=[a / r for a, r in zip(alphas, ranks)])
    merged = lora_delta(state, config["alpha"] / config["rank"])
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-5)


def test_merges_no_adapter_can_hold_are_refused():
    configs = [{"rank": 2, "alpha": 4.0, "target_modules": ["attn.to_q"]}] * 2
    with pytest.raises(ValueError, match="TIES merge of LoRA products is not low-rank"):
        merged_adapter([random_adapter(2, 0), random_adapter(2, 1)], configs, [1, 1], "ties")
    state, config = merged_adapter([random_adapter(2, 0), random_adapter(2, 1)], configs, [1, 1], "ties",
                                   lora_merge="factors")
    assert config["rank"] == 2 and state.keys() == random_adapter(2, 0).keys()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny pipeline folder, prompt files, two teacher adapters with random B, a spec and its data phase."""
    root = tmp_path_factory.mktemp("sd3")
    bundle = tiny_sd3_bundle()
    bundle.pipe.save_pretrained(root / "model")
    for task, words in (("sign", ["OK", "HI", "GO", "NO"]), ("poster", ["AB", "CD", "EF", "GH"])):
        for split in ("train", "test"):
            (root / f"{task}.{split}.txt").write_text("".join(f'a {task} that says "{w}"\n' for w in words))
    target = list(LoraSettings().target_modules)
    for seed, name in enumerate(("sign", "poster")):
        bundle.add_lora(name, rank=LORA["rank"], alpha=LORA["alpha"], target_modules=target, trainable=False)
        generator = torch.Generator().manual_seed(seed)
        state = {k: v + 0.1 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v
                 for k, v in bundle.adapter_state_dict(name).items()}
        with atomic_folder(root / name) as folder:  # as a teacher phase writes it: meta.json records the sha256s
            write_adapter(folder, state, LORA | {"target_modules": target, "dropout": 0.0})
            write_provenance(folder, "teacher", {})
    tasks = {task: {"prompts": {"kind": "file", "format": "lines", "train": str(root / f"{task}.train.txt"),
                                "test": str(root / f"{task}.test.txt")}, "reward": "ocr", "ocr": {}}
             for task in ("sign", "poster")}
    small = {"steps": 2, "prompts_per_step": 1, "group_size": 2, "checkpoint_every": 1, "sampler": {"steps": 3},
             "ema": {"decay": 0.9, "every": 1}}
    spec = {
        "name": "sd3-micro", "seed": 0,
        "model": {"kind": "sd3", "pretrained": str(root / "model"), "resolution": RESOLUTION, "dtype": "fp32",
                  "lora": LORA},
        "sampler": {"steps": 3, "cfg": 4.5},
        "tasks": tasks,
        "teachers": {task: {"task": task, "method": {"kind": "grpo"} | small} for task in tasks},
        "router": {"rules": [{"task": task, "teacher": task} for task in tasks], "default": "error"},
        "cold_start": {"method": "merge", "mode": "linear", "weights": {"sign": 1.0, "poster": 1.0}},
        "opd": small | {"lr": 1e-2},
        "mar": {"anchor": "poster", "weight": 0.02},
        "evaluation": {"seeds": [0], "n_prompts": 2, "grid_size": 2, "sampler": {"steps": 2, "noise_level": 0.0}},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    spec = load_spec(root / "spec.yaml")
    run_data(spec, root / "data")
    return root, spec, {name: root / name for name in ("sign", "poster")}


def test_the_sd3_student_starts_from_the_merged_adapter_beside_frozen_teachers(world):
    root, spec, teacher_dirs = world
    run_cold_start(spec, None, teacher_dirs, root / "data", root / "cold_start")
    merged, config = read_adapter(root / "cold_start")
    assert config["rank"] == 2 * LORA["rank"]
    meta = json.loads((root / "cold_start" / "meta.json").read_text())
    assert meta["method"] == "merge" and set(meta["teachers"]) == {"sign", "poster"}

    bundle, velocities, lora, init = sd3_models(spec, root / "cold_start", ["sign", "poster", "base"], teacher_dirs,
                                                torch.device("cpu"))
    teachers = {name: velocities[name] for name in ("sign", "poster")}
    trainer = OPDTrainer(bundle, spec.opd, [], [], {}, seed=0, lora=lora, init_adapter=init)
    assert set(bundle.adapters) == {"sign", "poster", ADAPTER} and lora.rank == 2 * LORA["rank"]
    for key, value in bundle.adapter_state_dict(ADAPTER).items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0)
    assert {n for n, p in bundle.transformer.named_parameters() if p.requires_grad} == set(trainer.named_params)
    assert all(f".{ADAPTER}." in n for n in trainer.named_params)

    # the student's starting velocity is the base with the product merge folded into its weights (exact)
    bundle.set_adapter(ADAPTER)
    cond = bundle.encode(['a sign that says "OK"'])
    x = torch.randn(1, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    folded = SD3Bundle.from_pretrained(str(root / "model"), resolution=RESOLUTION)
    delta = merge_lora([read_adapter(teacher_dirs[n])[0] for n in ("sign", "poster")], [1.0, 1.0],
                       scaling=LORA["alpha"] / LORA["rank"])
    folded.transformer.load_state_dict(fold_delta(folded.transformer.state_dict(), delta))
    with torch.no_grad():
        v_student, v_folded = bundle.velocity(x, 0.6, cond), folded.velocity(x, 0.6, cond)
        v_teacher, v_base = teachers["sign"](x, 0.6, cond, 1.0), velocities["base"](x, 0.6, cond, 1.0)
    assert bundle.active_adapter == ADAPTER  # the teacher's and the base's forwards switched back
    torch.testing.assert_close(v_student, v_folded, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v_student, v_base) and not torch.allclose(v_teacher, v_student)


def test_sd3_opd_trains_the_student_adapter_only_then_evaluates_it(world):
    root, spec, teacher_dirs = world
    if not (root / "cold_start").exists():
        run_cold_start(spec, None, teacher_dirs, root / "data", root / "cold_start")
    before = {name: load_file(folder / "adapter.safetensors") for name, folder in teacher_dirs.items()}
    run_opd(spec, root / "cold_start", None, teacher_dirs, root / "data", root / "opd", progress=False)
    student, config = read_adapter(root / "opd")
    start, _ = read_adapter(root / "cold_start")
    assert config["rank"] == 2 * LORA["rank"] and student.keys() == start.keys()
    assert any(not torch.equal(student[k], start[k]) for k in student)
    for name, folder in teacher_dirs.items():  # teachers are read, never written
        after = load_file(folder / "adapter.safetensors")
        assert all(torch.equal(after[k], before[name][k]) for k in after)
    meta = json.loads((root / "opd" / "meta.json").read_text())
    assert meta["routing"] == {"sign": 4, "poster": 4} and meta["anchor"] == "poster"
    rows = (root / "opd" / "curve.csv").read_text().splitlines()
    assert len(rows) == 1 + spec.opd.steps and "kl_sign" in rows[0]

    run_eval(spec, root / "opd", root / "data", "flow_opd", root / "eval", root / "metrics.json", progress=False)
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics.keys() == {"model", "sign", "poster", "avg"} and metrics["model"] == "flow_opd"
    assert all(0.0 <= metrics[task] <= 1.0 for task in ("sign", "poster"))
    assert (root / "eval" / "grid_sign.png").exists()


def test_sd3_sft_cold_start_fits_a_new_adapter_to_the_teachers_samples(world):
    root, _, teacher_dirs = world
    (root / "sft.yaml").write_text(f"extends: {root / 'spec.yaml'}\n" + yaml.safe_dump({"cold_start": {
        "method": "sft", "steps": 2, "batch_size": 2, "lr": 1e-2, "samples_per_prompt": 2, "best_of_group": True,
        "sampler": {"steps": 2, "noise_level": 0.0}}}))
    spec = load_spec(root / "sft.yaml")
    before = {name: load_file(folder / "adapter.safetensors") for name, folder in teacher_dirs.items()}
    run_cold_start(spec, None, teacher_dirs, root / "data", root / "sft", progress=False)
    student, config = read_adapter(root / "sft")
    assert config["rank"] == LORA["rank"] and student.keys() == before["sign"].keys()
    assert any(v.abs().sum() > 0 for k, v in student.items() if "lora_B" in k)  # B starts at 0: it trained
    for name, folder in teacher_dirs.items():
        after = load_file(folder / "adapter.safetensors")
        assert all(torch.equal(after[k], before[name][k]) for k in after)
    meta = json.loads((root / "sft" / "meta.json").read_text())
    assert meta["method"] == "sft" and meta["samples"] == 8 and meta["routing"] == {"sign": 4, "poster": 4}
    assert len((root / "sft" / "curve.csv").read_text().splitlines()) == 1 + 2



def test_sd3_loading_takes_the_t5_length_and_vae_dtype_from_the_spec(world):
    from flowopd.models.loading import load_bundle

    _, spec, _ = world
    default = load_bundle(spec, None, torch.device("cpu"))
    assert default.max_sequence_length == 256 and default.vae.dtype == torch.float32
    model = spec.model.model_copy(update={"max_sequence_length": 7, "vae_dtype": "bf16"})
    bundle = load_bundle(spec.model_copy(update={"model": model}), None, torch.device("cpu"))
    assert bundle.max_sequence_length == 7 and bundle.vae.dtype == torch.bfloat16
    assert bundle.encode(['a sign that says "OK"']).prompt_embeds.shape[1] == 77 + 7


def test_the_sd3_base_is_an_artifact_without_adapter_evaluated_as_the_bare_pretrained_model(world):
    from flowopd.models.loading import load_model
    from flowopd.phases.base import run_base

    root, spec, _ = world
    run_base(spec, root / "base")
    assert sorted(p.name for p in (root / "base").iterdir()) == ["meta.json", "spec.json"]
    meta = json.loads((root / "base" / "meta.json").read_text())
    assert (meta["phase"], meta["pretrained"], meta["revision"]) == ("base", spec.model.pretrained, None)
    bundle = load_model(spec, root / "base", torch.device("cpu"))
    assert bundle.adapters == []  # the bare pretrained transformer
    run_eval(spec, root / "base", root / "data", "base", root / "eval_base", root / "base.json", progress=False)
    assert json.loads((root / "base.json").read_text())["model"] == "base"
    with pytest.raises(SystemExit, match="no curve"):
        run_base(spec, root / "base_2", root / "curve.csv")

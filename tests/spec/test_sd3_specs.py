"""specs/sd3/: every file validates, and the main run says what the paper and Flow-GRPO published (docs/method.md)."""

import copy
from pathlib import Path

import pytest
import yaml

from flowopd.spec import SpecError, load_spec, resolve_raw, spec_hash, validate_spec

ROOT = Path(__file__).resolve().parents[2]
SD3_SPECS = sorted((ROOT / "specs" / "sd3").glob("*.yaml"))
MAIN = ROOT / "specs" / "sd3" / "flow_opd.yaml"
FLOW_GRPO_TARGETS = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"}


def test_the_sd3_folder_has_the_papers_runs():
    assert {p.name for p in SD3_SPECS} >= {"flow_opd.yaml", "sft_init.yaml", "no_mar.yaml"}


@pytest.mark.parametrize("path", SD3_SPECS, ids=lambda p: p.name)
def test_sd3_spec_validates_with_published_settings(path):
    spec = load_spec(path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# Run: flowopd pipeline write && cd sd3 && dvc repro")
    assert f"specs/sd3/{path.name}" in lines[0]
    assert lines[1] == "# yaml-language-server: $schema=../schema.json"
    model = spec.model
    assert (model.kind, model.pretrained, model.resolution) == ("sd3", "stabilityai/stable-diffusion-3.5-medium", 512)
    assert (model.lora.rank, model.lora.alpha) == (32, 64.0) and set(model.lora.target_modules) == FLOW_GRPO_TARGETS
    phases = [t.method for t in spec.teachers.values()] + [spec.baseline.method, spec.opd]
    for phase in phases:  # training: 10 SDE steps, noise 0.7, CFG 4.5, PPO eps 1e-4, the model's adapter
        sampler = phase.sampler
        assert (sampler.steps, sampler.noise_level, sampler.cfg, sampler.shift) == (10, 0.7, 4.5, 3.0)
        assert phase.clip_eps == 1e-4 and phase.lora is None and phase.cfg_train
        assert (phase.ema.decay, phase.ema.every) == (0.9, 8)
    for name, grpo in zip([*spec.teachers, "baseline"], phases[:-1], strict=True):  # Flow-GRPO's beta per reward
        beta = 0.01 if name == "pickscore" else 0.04
        assert (grpo.group_size, grpo.beta, grpo.lr, grpo.adv_std) == (24, beta, 3e-4, "global")
        # Flow-GRPO's KL term and detached unconditional branch, so its betas mean the same here
        assert (grpo.sampler.kl_form, grpo.sampler.uncond_grad) == ("flow_grpo", False)
    assert (model.max_sequence_length, model.vae_dtype) == (128, "fp32")
    assert spec.opd.group_size == 16 and spec.opd.estimator == "sampled"
    evaluation = spec.evaluation.sampler  # evaluation: 40 ODE steps, CFG 4.5
    assert (evaluation.steps, evaluation.noise_level, evaluation.cfg) == (40, 0.0, 4.5)
    assert spec.evaluation.benchmarks == ("geneval", "ocr", "deqa", "pickscore")
    if spec.cold_start.method == "sft":
        assert (spec.cold_start.sampler.steps, spec.cold_start.sampler.cfg) == (10, 4.5)
    expected_mar = 0.0 if path.name == "no_mar.yaml" else 0.02
    assert (spec.mar.anchor, spec.mar.weight) == ("deqa", expected_mar)


def test_sd3_tasks_prompts_and_rewards():
    spec = load_spec(MAIN)
    tasks = spec.tasks
    assert {n: (t.reward, t.metric, t.normaliser) for n, t in tasks.items()} == {
        "geneval": ("remote", "correct", 1.0), "ocr": ("ocr", "score", 1.0), "pickscore": ("pickscore", "score", 26.0),
        "deqa": ("remote", "score", 5.0)}  # the paper's Avg: GenEval, OCR, DeQA / 5, PickScore / 26
    assert tasks["geneval"].prompts.format == "geneval_jsonl"
    assert all(t.prompts.kind == "file" and t.prompts.train.startswith("data/sd3/") for t in tasks.values())
    assert {t.prompts.format for n, t in tasks.items() if n != "geneval"} == {"lines"}
    assert tasks["geneval"].remote.metrics == ("score", "strict", "correct") and tasks["deqa"].remote.timeout == 120.0
    assert tasks["pickscore"].pickscore.model == "models/PickScore_v1" and tasks["ocr"].ocr is not None
    assert spec.baseline.weights == {"geneval": 3.0, "ocr": 1.0, "pickscore": 1.0}  # GRPO-Mix 3 : 1 : 1
    assert spec.baseline.advantage == "per_reward"  # scale-free across raw PickScore and 0-1 accuracies
    assert [(r.task, r.teacher) for r in spec.router.rules] == [(t, t) for t in ("geneval", "ocr", "pickscore", "deqa")]
    assert spec.cold_start.method == "merge" and spec.cold_start.lora_merge == "product"


def test_ablations_share_teachers_with_the_main_run():
    main = load_spec(MAIN)
    for path in SD3_SPECS:
        spec = load_spec(path)
        assert spec.section_hash("model", "sampler", "tasks", "teachers") == main.section_hash(
            "model", "sampler", "tasks", "teachers")
        assert path == MAIN or spec_hash(spec) != spec_hash(main)


# ---------------------------------------------------------------- the reward-settings checks the sd3 specs rely on
def main_data() -> dict:
    return copy.deepcopy(resolve_raw(MAIN))


def edited(dotted: str, value) -> dict:
    data = main_data()
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("dotted, value, expected", [
    ("tasks.deqa.remote", None, "tasks.deqa: reward 'remote' needs its settings: add a `remote` mapping"),
    ("tasks.pickscore.pickscore", None, "tasks.pickscore: reward 'pickscore' needs its settings"),
    ("tasks.ocr.pickscore", {"model": "m"}, "tasks.ocr: `pickscore` settings given but reward is 'ocr'"),
    ("tasks.geneval.metric", "accuracy", "tasks.geneval: reward 'remote' has no metric 'accuracy' (it has: score, strict, correct)"),
    ("tasks.deqa.remote", {"url": "http://h:1", "metrics": ["quality"]},
     'tasks.deqa.remote.metrics: must include "score"'),
    ("tasks.deqa.remote", {"url": "ftp://h:1"}, "tasks.deqa.remote.url: String should match pattern"),
    ("tasks.deqa.remote", {"url": "http://h:1", "retries": -1}, "tasks.deqa.remote.retries: Input should be greater"),
    ("tasks.ocr.ocr", None, "tasks.ocr.ocr: the tiny world's OCR reader reads only tiny renders"),
    ("tasks.ocr.ocr", {"page_mode": "columns"}, "tasks.ocr.ocr.page_mode: Input should be"),
    ("tasks.deqa", {"prompts": {"kind": "file", "train": "a.txt", "test": "b.txt"}, "reward": "quality"},
     "tasks.deqa.reward: reward 'quality' scores the tiny world's renders"),
])
def test_reward_settings_problems_name_the_field(dotted, value, expected):
    with pytest.raises(SpecError) as caught:
        validate_spec(edited(dotted, value), "sd3.yaml")
    assert any(line.startswith(f"sd3.yaml: {expected}") for line in caught.value.problems), caught.value.problems


def test_objects_reward_needs_tiny_prompts():
    data = yaml.safe_load("""
        name: t
        tasks:
          objects: {prompts: {kind: file, train: a.txt, test: b.txt}, reward: objects, metric: strict}
        teachers: {objects: {task: objects}}
        router: {default: objects}
        cold_start: {method: none}
        """)
    with pytest.raises(SpecError, match="tasks.objects.reward: reward 'objects' needs the tiny world's structured"):
        validate_spec(data, "t.yaml")

"""The SFT cold start on the tiny random SD3: targets from the evaluation's ODE, samples kept on the host, prompts
embedded once and the text encoders freed, decodes and forwards no larger than their micro-batches."""

import hashlib

import pytest
import torch
import yaml
from tiny_sd3 import RESOLUTION, tiny_sd3_bundle

import flowopd.methods.sft as sft_module
from flowopd.flow.sampler import sample
from flowopd.methods.sft import SAMPLE_BATCH, sft_cold_start, target_sampler
from flowopd.phases.data import run_data
from flowopd.phases.keys import cold_start_sub_spec, stage_key
from flowopd.spec import SFTColdStart, load_spec
from flowopd.spec import choices as C
from flowopd.train.streams import SFT_SAMPLE_STREAM, step_generator
from flowopd.world.prompt_sets import training_prompts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SFT = {"method": "sft", "steps": 2, "batch_size": 4, "lr": 1e-2, "samples_per_prompt": 2, "micro_batch": 2,
       "lora": {"rank": 2, "alpha": 4.0}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD3 spec whose rollout sampler (SDE, 3 steps, cfg 4.5) and evaluation sampler (ODE, 2 steps, cfg 2)
    differ; every prompt is routed to the base; its data phase."""
    root = tmp_path_factory.mktemp("sft_targets")
    for task, words in (("sign", ["OK", "HI", "GO"]), ("poster", ["AB", "CD", "EF"])):
        for split in ("train", "test"):
            (root / f"{task}.{split}.txt").write_text("".join(f'a {task} that says "{w}"\n' for w in words))
    tasks = {task: {"prompts": {"kind": "file", "format": "lines", "train": str(root / f"{task}.train.txt"),
                                "test": str(root / f"{task}.test.txt")}, "reward": "ocr", "ocr": {}}
             for task in ("sign", "poster")}
    spec = {
        "name": "sft-targets", "seed": 0,
        "model": {"kind": "sd3", "pretrained": str(root / "model"), "resolution": RESOLUTION, "dtype": "fp32"},
        "sampler": {"steps": 3, "cfg": 4.5, "noise_level": 0.7},
        "tasks": tasks,
        "teachers": {task: {"task": task, "method": {"kind": "grpo"}} for task in tasks},
        "router": {"rules": [], "default": "base"},
        "cold_start": SFT,
        "evaluation": {"seeds": [0], "sampler": {"steps": 2, "noise_level": 0.0, "cfg": 2.0}},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    spec = load_spec(root / "spec.yaml")
    run_data(spec, root / "data")
    return spec, *training_prompts(spec, root / "data")


def with_cold_start(spec, **changes):
    return spec.model_copy(update={"cold_start": spec.cold_start.model_copy(update=changes)})


def run_sft(spec, prompts, tasks, monkeypatch, bundle=None):
    """sft_cold_start on `bundle` (a fresh tiny SD3) -> (bundle, what sft was given: x0, texts)."""
    bundle, given = (bundle or tiny_sd3_bundle()).to(DEVICE), {}

    def recording_sft(base, x0, texts, *args, **kwargs):
        given.update(x0=x0, texts=texts)
        return original(base, x0, texts, *args, **kwargs)

    original = sft_module.sft
    monkeypatch.setattr(sft_module, "sft", recording_sft)
    sft_cold_start(spec, bundle, {"base": bundle.adapter_bundle(None)}, prompts, tasks, progress=False)
    return bundle, given


def base_samples(bundle, prompts, sampler, group: int, micro_batch: int):
    """What the base's rows of the cold start are with `sampler` from the SFT sampling stream's noise (the bare base
    of `bundle`, whose student adapter has trained since)."""
    bundle = bundle.adapter_bundle(None)
    key = int.from_bytes(hashlib.sha256(b"base").digest()[:4], "little")
    texts = [p.text for p in prompts for _ in range(group)]
    assert len(texts) <= SAMPLE_BATCH  # one sampling call
    noise = torch.randn((len(texts), *bundle.latent_shape), generator=step_generator(0, SFT_SAMPLE_STREAM, key))
    return sample(bundle, bundle.encode(texts), steps=sampler.steps, shift=sampler.shift, cfg=sampler.cfg,
                  noise_level=sampler.noise_level, generator=step_generator(0, SFT_SAMPLE_STREAM, key),
                  x_init=noise, micro_batch=micro_batch).cpu()


def test_sft_targets_are_the_evaluation_samplers_output_kept_on_the_host(world, monkeypatch):
    spec, prompts, tasks = world
    assert target_sampler(spec) == spec.evaluation.sampler
    bundle, given = run_sft(spec, prompts, tasks, monkeypatch)
    assert given["x0"].device.type == "cpu" and bundle.device.type == DEVICE
    assert bundle.text_encoders_released and bundle.pipe.text_encoder_3 is None
    assert given["texts"] == [p.text for p in prompts for _ in range(2)]
    expected = base_samples(bundle, prompts, spec.evaluation.sampler, 2, micro_batch=2)
    assert torch.equal(given["x0"], expected)  # bit for bit (CPU), the same noise through the evaluation's ODE
    rollout = base_samples(bundle, prompts, spec.cold_start.sampler, 2, micro_batch=2)
    assert not torch.allclose(given["x0"], rollout, atol=1e-3)


def test_the_rollout_target_sampler_is_the_cold_starts_own(world, monkeypatch):
    spec, prompts, tasks = world
    spec = with_cold_start(spec, target_sampler="rollout")
    assert target_sampler(spec) == spec.cold_start.sampler and spec.cold_start.sampler.noise_level == 0.7
    bundle, given = run_sft(spec, prompts, tasks, monkeypatch)
    sampler = spec.cold_start.sampler  # the SDE draws its steps' noise after the initial noise, from one stream
    key = int.from_bytes(hashlib.sha256(b"base").digest()[:4], "little")
    texts = [p.text for p in prompts for _ in range(2)]
    expected = sample(bundle.adapter_bundle(None), bundle.encode(texts), steps=sampler.steps, shift=sampler.shift, cfg=sampler.cfg,
                      noise_level=sampler.noise_level, generator=step_generator(0, SFT_SAMPLE_STREAM, key),
                      micro_batch=2).cpu()
    assert torch.equal(given["x0"], expected)


def test_best_of_group_decodes_and_scores_in_chunks_and_no_forward_exceeds_its_micro_batch(world, monkeypatch):
    spec, prompts, tasks = world
    spec = with_cold_start(spec, best_of_group=True, decode_batch=3, reward_batch=5)
    seen = {"decoder": [], "t5": [], "transformer": []}

    def record(name):
        return lambda _, args, kwargs, out: seen[name].append((args[0] if args else next(iter(kwargs.values())))
                                                              .shape[0])

    bundle = tiny_sd3_bundle()
    for name, module in (("decoder", bundle.vae.decoder), ("t5", bundle.pipe.text_encoder_3),
                         ("transformer", bundle.transformer)):
        module.register_forward_hook(record(name), with_kwargs=True)
    bundle, given = run_sft(spec, prompts, tasks, monkeypatch, bundle)
    assert seen["decoder"] == [3, 2, 3, 2, 2]  # 12 samples scored 5, 5 and 2 at a time, decoded 3 at a time
    assert seen["t5"] == [1, 2, 2, 2]  # "" alone, then the 6 prompts 2 at a time, once each
    assert seen["transformer"] and max(seen["transformer"]) <= 2 * 2  # micro_batch rows, doubled by CFG
    assert len(given["x0"]) == len(prompts) and given["x0"].device.type == "cpu"  # the best of each pair


def test_the_stage_key_follows_the_sampler_the_targets_come_from(world):
    spec = world[0]
    key = stage_key(cold_start_sub_spec(spec))
    other_eval = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={
        "sampler": spec.evaluation.sampler.model_copy(update={"steps": 5})})})
    other_rollout = with_cold_start(spec, sampler=spec.cold_start.sampler.model_copy(update={"steps": 5}))
    assert stage_key(cold_start_sub_spec(other_eval)) != key
    assert stage_key(cold_start_sub_spec(other_rollout)) == key  # unused while the targets are the evaluation's
    rollout = with_cold_start(spec, target_sampler="rollout")
    rollout_other = with_cold_start(other_rollout, target_sampler="rollout")
    assert stage_key(cold_start_sub_spec(rollout_other)) != stage_key(cold_start_sub_spec(rollout))
    other_eval_rollout = with_cold_start(other_eval, target_sampler="rollout")
    assert stage_key(cold_start_sub_spec(other_eval_rollout)) == stage_key(cold_start_sub_spec(rollout))


def test_the_schema_offers_exactly_the_target_samplers():
    import typing

    assert typing.get_args(SFTColdStart.model_fields["target_sampler"].annotation) == C.SFT_TARGET_SAMPLERS
    assert SFTColdStart(method="sft").target_sampler == "evaluation"

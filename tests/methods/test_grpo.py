"""Flow-GRPO: advantages by hand, PPO-clip gradients, the KL term, teacher / baseline runs, bit-identical resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowopd.flow.sampler import sample
from flowopd.flow.sde import kl_from_velocities, step_kl
from flowopd.methods.grpo import GRPOTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.phases.baseline import run_baseline
from flowopd.phases.data import run_data
from flowopd.phases.keys import teacher_sub_spec
from flowopd.phases.teacher import run_teacher
from flowopd.runtime.artifacts import atomic_folder, write_provenance
from flowopd.spec import (
    EmaSettings,
    GRPOSettings,
    LoraSettings,
    SamplerSettings,
    deep_merge,
    load_spec,
    resolve_raw,
    validate_spec,
)
from flowopd.train.losses import ppo_clip_loss
from flowopd.train.policy import step_log_prob
from flowopd.train.rollouts import group_advantages, mixed_advantages, trained_steps
from flowopd.train.state import Checkpoints
from flowopd.train.trainer import train
from flowopd.world import make_prompt_set
from flowopd.world.grammar import WorldConfig

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "data" / "micro.yaml"
SAMPLER = SamplerSettings(steps=3, shift=3.0, noise_level=0.7, cfg=3.0)
MICRO_GRPO = {"group_size": 4, "prompts_per_step": 2, "steps": 3, "checkpoint_every": 1, "sampler": {"steps": 3},
              "ema": {"decay": 0.9, "every": 1}}


class Brightness:
    """A toy reward with variance on any image: mean pixel value in [0, 1]."""

    name = "brightness"

    def __call__(self, images, prompts):
        return {"score": images.reshape(len(images), -1).mean(1) / 255.0}


def micro_settings(**overrides) -> GRPOSettings:
    values = {"group_size": 4, "prompts_per_step": 2, "steps": 3, "lr": 1e-3, "sampler": SAMPLER,
              "ema": EmaSettings(every=1)}
    return GRPOSettings(**(values | overrides))


@pytest.fixture(scope="module")
def spec():
    return load_spec(MICRO)


@pytest.fixture(scope="module")
def base_state(spec):
    torch.manual_seed(0)
    return TinyBundle(tiny_model_config(spec)).eval().state_dict()


@pytest.fixture
def bundle(spec, base_state):
    fresh = TinyBundle(tiny_model_config(spec))
    fresh.load_state_dict(base_state)
    return fresh.eval()


@pytest.fixture(scope="module")
def prompts():
    return make_prompt_set(WorldConfig(), "quality", 8, 0, "train")


def make_trainer(bundle, prompts, **overrides):
    lora = overrides.pop("lora", None)
    return GRPOTrainer(bundle, micro_settings(**overrides), prompts, np.zeros(len(prompts), dtype=int),
                       [Brightness()], ["brightness"], [1.0], seed=0, lora=lora)


def micro_spec(**grpo):
    raw = resolve_raw(MICRO)
    grpo = MICRO_GRPO | grpo
    return validate_spec(deep_merge(raw, {"teachers": {"quality": {"method": grpo}}, "baseline": {"method": grpo}}))


# ---------------------------------------------------------------- advantages
def test_group_std_advantages_by_hand():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    advantages, kept = group_advantages(rewards, 4, std="group")
    std = np.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4)  # population std of 1..4
    np.testing.assert_allclose(advantages[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    np.testing.assert_array_equal(advantages[4:], 0.0)  # zero-variance group: dropped
    np.testing.assert_array_equal(kept, [True] * 4 + [False] * 4)


def test_global_std_advantages_by_hand():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    advantages, kept = group_advantages(rewards, 4, std="global")
    std = np.sqrt(((1 - 3.75) ** 2 + (2 - 3.75) ** 2 + (3 - 3.75) ** 2 + (4 - 3.75) ** 2 + 4 * 1.25**2) / 8)
    np.testing.assert_allclose(advantages[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    np.testing.assert_array_equal(advantages[4:], 0.0)
    assert kept[:4].all() and not kept[4:].any()


def test_advantages_are_clipped():
    advantages, _ = group_advantages([0.0, 0.0, 0.0, 10.0], 4, clip=1.0)
    std = np.sqrt((3 * 2.5**2 + 7.5**2) / 4)
    np.testing.assert_allclose(advantages, [-2.5 / (std + 1e-4)] * 3 + [1.0])


def test_mixed_advantages_joint_and_per_reward():
    # Two rewards, each scoring its own task's group of 2; NaN where a reward does not apply.
    scores = np.array([[0.0, np.nan], [1.0, np.nan], [np.nan, 0.2], [np.nan, 0.6]])
    weights = [2.0, 0.5]
    joint, kept = mixed_advantages(scores, weights, 2, "joint", "global")
    total = np.array([0.0, 2.0, 0.1, 0.3])  # w_k * score
    np.testing.assert_allclose(joint, np.array([-1.0, 1.0, -0.1, 0.1]) / (total.std() + 1e-4))
    assert kept.all()
    per_reward, _ = mixed_advantages(scores, weights, 2, "per_reward", "global")
    a_0 = np.array([-0.5, 0.5]) / (0.5 + 1e-4)  # reward 0's own global std over its two samples: 0.5
    a_1 = np.array([-0.2, 0.2]) / (0.2 + 1e-4)
    np.testing.assert_allclose(per_reward, np.concatenate([2.0 * a_0, 0.5 * a_1]))
    with pytest.raises(ValueError, match="whole groups"):
        mixed_advantages(np.array([[1.0], [np.nan], [2.0], [3.0]]), [1.0], 2, "per_reward")


def test_trained_steps_never_include_the_last_step():
    rng = np.random.default_rng(0)
    assert trained_steps(10, 1.0, rng) == list(range(9))
    subset = trained_steps(10, 0.5, rng)
    assert len(subset) == 4 and subset == sorted(subset) and max(subset) < 9  # round(0.5 * 9) = 4


# ---------------------------------------------------------------- PPO-clip
def test_ppo_gradient_at_ratio_one_is_the_policy_gradient(bundle, prompts):
    """r = 1 (fresh log-prob = stored one): grad of the PPO loss equals -A grad log p."""
    cond = bundle.encode([p.text for p in prompts[:4]])
    _, trajectory = sample(bundle, cond, steps=3, shift=3.0, cfg=3.0, noise_level=0.7,
                           generator=torch.Generator().manual_seed(0), return_trajectory=True)
    t = 1
    sigma, sigma_next = trajectory.sigmas[t].item(), trajectory.sigmas[t + 1].item()
    advantages = torch.tensor([1.0, -0.5, 2.0, -2.5])
    params = [p for p in bundle.transformer.parameters()]

    def log_prob():
        return step_log_prob(bundle, trajectory.latents[t], trajectory.latents[t + 1], sigma, sigma_next, cond,
                             cfg=3.0, noise_level=0.7, reduction="mean")[0]

    fresh = log_prob()
    assert torch.allclose(fresh, trajectory.log_probs[t], atol=1e-6)  # the update sees the rollout policy
    loss, _ = ppo_clip_loss(fresh, trajectory.log_probs[t], advantages, 1e-4)
    grads_ppo = torch.autograd.grad(loss.mean(), params, allow_unused=True)
    grads_pg = torch.autograd.grad(-(advantages * log_prob()).mean(), params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(grads_ppo, grads_pg) if a is not None]
    assert pairs and sum(b.abs().sum() for _, b in pairs) > 0
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    ("advantage", "ratio", "flows"),
    [(1.0, 1 + 2e-2, False), (1.0, 1 - 2e-2, True), (-1.0, 1 - 2e-2, False), (-1.0, 1 + 2e-2, True)],
)
def test_clipping_stops_the_gradient_only_where_it_applies(advantage, ratio, flows):
    eps = 1e-2
    log_prob = torch.tensor(np.log(ratio), requires_grad=True)
    loss, _ = ppo_clip_loss(log_prob, torch.tensor(0.0), torch.tensor(advantage), eps)
    loss.backward()
    expected = -advantage * ratio if flows else 0.0  # d(-A r)/d log p = -A r
    assert log_prob.grad.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_climbs_the_reward_either_way(spec, base_state, prompts, sign):
    """The sign of the whole pipeline: brighter images when brightness pays, darker when darkness does."""
    bundle = TinyBundle(tiny_model_config(spec))
    bundle.load_state_dict(base_state)
    reward = lambda images, p: {"score": sign * Brightness()(images, p)["score"]}
    trainer = GRPOTrainer(bundle.eval(), micro_settings(lr=3e-3, beta=0.0), prompts, np.zeros(len(prompts), int),
                          [reward], ["signed"], [1.0])
    rewards = [row["reward"] for row in train(trainer, 20, progress=False)]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.05


# ---------------------------------------------------------------- KL term
def test_kl_term_equals_step_kl_of_the_two_means(bundle, prompts):
    trainer = make_trainer(bundle, prompts, beta=0.5)
    with torch.no_grad():  # move the policy away from the frozen reference
        for p in trainer.params:
            p.add_(0.02 * torch.randn_like(p))
    rollout = trainer.rollout(0)
    traj = rollout.trajectory
    expected = []
    for t in range(traj.steps - 1):
        sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
        with torch.no_grad():
            v_policy = bundle.velocity(traj.latents[t], sigma, rollout.cond, cfg=3.0)
            v_reference = trainer.reference.velocity(traj.latents[t], sigma, rollout.cond, 3.0)
            _, mean_p, std = step_log_prob(bundle, traj.latents[t], traj.latents[t + 1], sigma, sigma_next,
                                           rollout.cond, cfg=3.0, noise_level=0.7, reduction="mean")
            _, mean_r, _ = step_log_prob(bundle, traj.latents[t], traj.latents[t + 1], sigma, sigma_next,
                                         rollout.cond, cfg=3.0, noise_level=0.7, reduction="mean",
                                         velocity_fn=trainer.reference.velocity)
        kl = step_kl(mean_p, mean_r, std)
        torch.testing.assert_close(kl, kl_from_velocities(v_policy, v_reference, sigma, sigma_next, 0.7),
                                   rtol=1e-3, atol=1e-9)
        expected.append(kl.mean().item())
    n = len(rollout.prompts)
    stats = trainer.update(rollout, np.zeros(n), np.ones(n, dtype=bool), step=0)  # A = 0: loss is beta KL alone
    assert np.mean(expected) > 0
    assert stats["kl"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert stats["loss"] == pytest.approx(0.5 * np.mean(expected), rel=1e-5)
    assert stats["policy_loss"] == 0.0


def test_full_fine_tuning_reference_stays_the_starting_model(bundle, prompts):
    trainer = make_trainer(bundle, prompts, lr=1e-2)
    assert len(trainer.params) == len(list(bundle.transformer.parameters()))
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())
    x, cond = torch.randn(2, 3, 32, 32), bundle.encode(["a clean, sharp render of a red circle"] * 2)
    before = bundle.velocity(x, 0.5, cond, cfg=3.0)
    row = trainer.step(0)
    assert row["kept_groups"] == 1.0 and row["approx_kl"] == 0.0  # fresh log-probs equal the rollout's
    assert not torch.equal(bundle.velocity(x, 0.5, cond, cfg=3.0), before)
    torch.testing.assert_close(trainer.reference.velocity(x, 0.5, cond, 3.0), before, rtol=0, atol=0)


def test_zero_variance_step_trains_nothing(bundle, prompts):
    trainer = GRPOTrainer(bundle, micro_settings(), prompts, np.zeros(len(prompts), dtype=int),
                          [lambda images, p: {"score": np.ones(len(images))}], ["constant"], [1.0])
    before = [p.detach().clone() for p in trainer.params]
    row = trainer.step(0)
    assert row["kept_groups"] == 0.0 and row["loss"] is None and row["reward"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_training_only_the_kept_rows_matches_the_masked_update(spec, base_state, prompts):
    pool = prompts[:2]  # both prompts each step; the second one's group scores a constant and is dropped

    def reward(images, batch):
        bright = Brightness()(images, batch)["score"]
        return {"score": np.where([p.text == pool[0].text for p in batch], bright, 0.5)}

    params = []
    for kept_rows_only in (False, True):
        bundle = TinyBundle(tiny_model_config(spec))
        bundle.load_state_dict(base_state)
        trainer = GRPOTrainer(bundle.eval(), micro_settings(lr=1e-2, inner_epochs=2), pool, [0, 0], [reward], ["r"],
                              [1.0], kept_rows_only=kept_rows_only)
        row = trainer.step(0)
        assert row["kept_groups"] == 0.5
        params.append([p.detach().clone() for p in trainer.params])
    start = TinyBundle(tiny_model_config(spec))
    start.load_state_dict(base_state)
    assert any(not torch.equal(a, b) for a, b in zip(params[0], start.transformer.parameters()))
    # The two updates agree as a whole. Element by element they need not: Adam moves every weight by about lr, so an
    # element whose gradient is float noise (a sub-batch's velocities match the whole batch's only to rounding on
    # CPUs whose kernels depend on the batch size) can step either way; measured 2 of 4096 such elements.
    for a, b, s in zip(*params, start.transformer.parameters()):
        step_a, step_b = a - s, b - s
        assert (step_a - step_b).norm() <= 1e-2 * step_a.norm() + 1e-7


# ---------------------------------------------------------------- LoRA: tiny and sd3 bundles, one code path
def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(bundle, prompts):
    base = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    trainer = make_trainer(bundle, prompts, lora=LoraSettings(rank=4, alpha=8.0), lr=1e-2)
    assert trainer.params and all("lora_" in name for name in trainer.named_params)
    x, cond = torch.randn(2, 3, 32, 32), bundle.encode(["a clean, sharp render of a red circle"] * 2)
    reference_before = trainer.reference.velocity(x, 0.5, cond, 3.0)
    for step in range(2):
        trainer.step(step)
    state = bundle.transformer.state_dict()
    for key, value in base.items():  # base weights sit under peft's base_layer after injection
        module, name = key.rsplit(".", 1)
        torch.testing.assert_close(state.get(key, state.get(f"{module}.base_layer.{name}")), value)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trainer.named_params.items() if "lora_B" in n)
    torch.testing.assert_close(trainer.reference.velocity(x, 0.5, cond, 3.0), reference_before, rtol=0, atol=0)
    assert all(p.requires_grad for p in trainer.params)  # switching the adapter off and on kept the flags
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())


def test_grpo_step_on_an_sd3_bundle_with_lora(prompts):
    from tiny_sd3 import tiny_sd3_bundle

    bundle = tiny_sd3_bundle()
    frozen = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    trainer = make_trainer(bundle, prompts, lora=LoraSettings(rank=4, alpha=8.0), lr=1e-2)
    row = trainer.step(0)
    assert row["kept_groups"] > 0 and row["approx_kl"] < 1e-8 and row["grad_norm"] > 0
    lora_b = [p for n, p in trainer.named_params.items() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    state = bundle.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if k in state)


# ---------------------------------------------------------------- resume: bit-identical to an uninterrupted run
class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_bit_identically(tmp_path, spec, base_state, prompts):
    def run(checkpoints, stop_after=None):
        fresh = TinyBundle(tiny_model_config(spec))
        fresh.load_state_dict(base_state)
        trainer = make_trainer(fresh.eval(), prompts, steps=4, inner_epochs=2)

        def on_step(step):
            if step == stop_after:
                raise Interrupt

        curve = train(trainer, 4, checkpoints, checkpoint_every=1, progress=False, on_step=on_step)
        return trainer, curve

    reference, reference_curve = run(None)
    checkpoints = Checkpoints(tmp_path / "ckpt", "fingerprint")
    with pytest.raises(Interrupt):
        run(checkpoints, stop_after=1)
    assert torch.load(checkpoints.path, weights_only=False)["step"] == 2
    resumed, resumed_curve = run(checkpoints)
    for a, b in zip(reference.params, resumed.params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference.ema.shadow, resumed.ema.shadow, strict=True):
        assert torch.equal(a, b)
    assert [r["reward"] for r in resumed_curve] == [r["reward"] for r in reference_curve]
    assert reference_curve[-1]["clip_frac"] is not None
    # A checkpoint from other settings is ignored, not resumed.
    assert Checkpoints(tmp_path / "ckpt", "other").load() is None


# ---------------------------------------------------------------- phases
@pytest.fixture(scope="module")
def phase_inputs(tmp_path_factory, spec, base_state):
    root = tmp_path_factory.mktemp("grpo")
    run_data(spec, root / "data")
    bundle = TinyBundle(tiny_model_config(spec))
    bundle.load_state_dict(base_state)
    with atomic_folder(root / "base") as folder:  # as the base phase writes it: meta.json records each file's sha256
        bundle.save(folder)
        write_provenance(folder, "base", {})
    return root


def test_teacher_run_writes_its_artifact(phase_inputs):
    spec, root = micro_spec(), phase_inputs
    run_teacher(spec, "quality", root / "base", root / "data", root / "teacher", root / "curve.csv", progress=False)
    out = root / "teacher"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model_config.json", "curve.csv", "meta.json",
                                               "spec.json"}
    assert not (root / "teacher.ckpt").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["phase"] == "teacher" and meta["teacher"] == "quality" and meta["task"] == "quality"
    assert json.loads((out / "spec.json").read_text()) == teacher_sub_spec(spec, "quality")
    assert set(json.loads((out / "spec.json").read_text())["tasks"]) == {"quality"}
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("step,reward,reward_quality,kept_groups,loss") and len(rows) == 1 + 3
    assert (root / "curve.csv").read_text() == (out / "curve.csv").read_text()
    trained, base = load_file(out / "model.safetensors"), load_file(root / "base" / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in trained if k.startswith("transformer."))
    assert all(torch.equal(trained[k], base[k]) for k in trained if k.startswith("text_encoder."))
    TinyBundle.load(out)


def test_baseline_run_scores_each_task_with_its_reward(phase_inputs):
    spec, root = micro_spec(steps=2), phase_inputs
    run_baseline(spec, root / "base", root / "data", root / "baseline", progress=False)
    header = (root / "baseline" / "curve.csv").read_text().splitlines()[0].split(",")
    assert {"reward_objects", "reward_quality", "reward_text"} <= set(header)
    meta = json.loads((root / "baseline" / "meta.json").read_text())
    assert meta["phase"] == "baseline" and meta["tasks"] == ["objects", "quality", "text"]


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, phase_inputs):
    """A stage process killed (SIGKILL) after its first checkpoint resumes to bit-identical weights."""
    root = phase_inputs
    spec_file = tmp_path / "spec.yaml"
    method = json.dumps({"kind": "grpo"} | MICRO_GRPO | {"steps": 6})
    spec_file.write_text(f"extends: {MICRO}\nteachers:\n  quality:\n    method: {method}\n")
    spec = load_spec(spec_file)
    run_teacher(spec, "quality", root / "base", root / "data", tmp_path / "straight", progress=False)
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "stages" / "teacher.py"), "--spec", str(spec_file), "--teacher", "quality",
               "--base", str(root / "base"), "--data", str(root / "data"), "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = tmp_path / "killed.ckpt" / "state.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not out.exists()
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "resuming" in resumed.stdout
    straight, again = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    assert not checkpoint.parent.exists()

"""Micro-batches: a step split into micro-batches (gradients accumulated) trains the weights of the whole batch, no
transformer forward sees more rows than its micro-batch, and the rollout's split keeps the first PPO ratio at 1."""

import contextlib
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from flowopd.evaluation.benchmark import generate
from flowopd.methods.grpo import GRPOTrainer
from flowopd.methods.nft import NFTTrainer
from flowopd.methods.opd_trainer import OPDTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.methods.sft import sft, teacher_samples
from flowopd.models.bundle import micro_batched_scores, micro_batches
from flowopd.models.tiny import TinyBundle
from flowopd.spec import (
    GRPOSettings,
    NFTMethod,
    OPDSettings,
    SFTColdStart,
    SpecError,
    deep_merge,
    load_spec,
    resolve_raw,
    spec_hash,
    validate_spec,
)
from flowopd.world import make_prompt_set
from flowopd.world.grammar import WorldConfig

MICRO = Path(__file__).resolve().parents[1] / "data" / "micro.yaml"
SDE = {"steps": 3, "shift": 3.0, "noise_level": 0.7, "cfg": 3.0}
ODE = {"steps": 3, "shift": 3.0, "noise_level": 0.0, "cfg": 3.0}
# 8 samples a step. The accumulated gradients compare within 1e-5 of the largest one; the weights after one AdamW
# step within 1e-6 at lr 1e-5: its first step is lr g / (|g| + 1e-8), so a gradient entry near 1e-8 turns
# float-order noise of 1e-9 into a tenth of lr, whatever the micro-batches.
LR = 1e-5
BATCH = {"group_size": 4, "prompts_per_step": 2, "steps": 1, "lr": LR, "ema": None}
TOLERANCE = 1e-6
GRADIENT_TOLERANCE = 1e-5


class Brightness:
    name = "brightness"

    def __call__(self, images, prompts):
        return {"score": images.reshape(len(images), -1).mean(1) / 255.0}


@pytest.fixture(scope="module")
def spec():
    torch.set_num_threads(1)
    return load_spec(MICRO)


@pytest.fixture(scope="module")
def base_state(spec):
    torch.manual_seed(0)
    return TinyBundle(tiny_model_config(spec)).eval().state_dict()


def bundle_of(spec, state, perturb: int | None = None) -> TinyBundle:
    """The micro base; perturb=k: its transformer moved by seeded noise (a teacher)."""
    bundle = TinyBundle(tiny_model_config(spec))
    bundle.load_state_dict(state)
    if perturb is not None:
        generator = torch.Generator().manual_seed(perturb)
        with torch.no_grad():
            for p in bundle.transformer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return bundle.eval()


@pytest.fixture(scope="module")
def prompts():
    return make_prompt_set(WorldConfig(), "quality", 8, 0, "train")


@contextlib.contextmanager
def largest_forward(*transformers):
    """Records the most rows any forward of these transformers saw: seen[0]."""
    seen = [0]

    def hook(module, args, kwargs):
        seen[0] = max(seen[0], len(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]))

    handles = [t.register_forward_pre_hook(hook, with_kwargs=True) for t in transformers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def first_gradients():
    """The gradients the first optimizer step (of any optimizer) applies: grads[0], by parameter order."""
    grads = []

    def hook(optimizer, args, kwargs):
        if not grads:
            grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield grads
    finally:
        handle.remove()


def assert_same_gradients(a: list, b: list) -> None:
    scale = max(g.abs().max().item() for g in a)
    assert scale > 0
    assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) <= GRADIENT_TOLERANCE * scale


def largest_difference(a: TinyBundle, b: TinyBundle) -> float:
    """The largest absolute difference between two bundles' transformer weights."""
    state_b = b.transformer.state_dict()
    return max((v - state_b[k]).abs().max().item() for k, v in a.transformer.state_dict().items())


def assert_moved(trained: TinyBundle, spec, base_state) -> None:
    assert largest_difference(trained, bundle_of(spec, base_state)) > LR / 2  # the step did train


# ---------------------------------------------------------------- the split itself
def test_micro_batches_cover_the_batch_in_order():
    assert micro_batches(8, None) == [slice(0, 8)]
    assert micro_batches(8, 8) == micro_batches(8, 20) == [slice(0, 8)]
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_reward_batches_score_like_one_call(prompts):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    calls = []

    def reward(batch, batch_prompts):
        calls.append(len(batch))
        return Brightness()(batch, batch_prompts)

    whole = Brightness()(images, prompts[:5])["score"]
    np.testing.assert_array_equal(micro_batched_scores(reward, images, prompts[:5], 2)["score"], whole)
    assert calls == [2, 2, 1]


# ---------------------------------------------------------------- spec fields
def test_micro_batch_fields_are_checked_and_left_out_of_the_hash_at_their_default():
    raw = resolve_raw(MICRO)
    plain = validate_spec(raw)
    explicit = validate_spec(deep_merge(raw, {"opd": {"micro_batch": None, "gradient_checkpointing": False},
                                              "evaluation": {"decode_batch": None}}))
    assert spec_hash(explicit) == spec_hash(plain)  # specs written before these fields keep their hash
    assert "micro_batch" not in plain.opd.model_dump()
    split = validate_spec(deep_merge(raw, {"teachers": {"text": {"method": {"micro_batch": 1}}}}))
    assert split.teachers["text"].method.model_dump()["micro_batch"] == 1
    with pytest.raises(SpecError, match=r"teachers\.text\.method: micro_batch 3 is larger than the batch it "
                                        r"splits \(prompts_per_step x group_size = 2\)"):
        validate_spec(deep_merge(raw, {"teachers": {"text": {"method": {"micro_batch": 3}}}}))
    with pytest.raises(SpecError, match=r"opd\.micro_batch"):
        validate_spec(deep_merge(raw, {"opd": {"micro_batch": 0}}))
    with pytest.raises(ValueError, match="reward_batch 9 is larger"):
        GRPOSettings(**BATCH, sampler=SDE, reward_batch=9)
    with pytest.raises(ValueError, match=r"micro_batch 5 is larger than the batch it splits \(batch_size = 4\)"):
        SFTColdStart(method="sft", batch_size=4, micro_batch=5)


# ---------------------------------------------------------------- one step of each trainer, whole vs micro-batches
# The split trainer draws its rollout in micro-batches; the whole-batch trainer trains on that same rollout (a
# rollout drawn whole differs by float order, enough to flip a decoded pixel and so a reward), and the split rollout
# is compared with the whole trainer's own draw separately.
def run_step(trainer, modules, rollout=None):
    """One step; rollout: train on these samples instead of drawing them. -> (curve row with the first gradients
    and the most rows any forward saw, the rollout trained on)."""
    with largest_forward(*modules) as seen, first_gradients() as grads:
        drawn = trainer.rollout(0) if rollout is None else copy.deepcopy(rollout)
        trainer.rollout = lambda step: drawn
        row = trainer.step(0)
    return row | {"grads": grads[0], "rows": seen[0]}, drawn


def compare_steps(make, start: TinyBundle, keys=("loss",), whole_rows: int = 2 * 8) -> tuple[dict, dict]:
    """make(**memory) -> (trainer, its transformers): one step whole and one in micro-batches of 2 from the weights
    of `start`, checked. whole_rows: the largest forward of the whole step (CFG: 2 rows per sample)."""
    (split, split_modules), (whole, whole_modules) = make(micro_batch=2), make()
    own = whole.rollout(0)
    split_row, rollout = run_step(split, split_modules)
    torch.testing.assert_close(rollout.trajectory.latents, own.trajectory.latents, rtol=1e-5, atol=1e-5)
    whole_row, _ = run_step(whole, whole_modules, rollout)
    assert whole_row["rows"] == whole_rows and split_row["rows"] == 2 * 2  # CFG: 2 rows per sample in one forward
    assert_same_gradients(whole_row["grads"], split_row["grads"])
    assert largest_difference(whole.bundle, split.bundle) < TOLERANCE
    assert largest_difference(split.bundle, start) > LR / 2  # the step did train
    for key in keys:
        assert split_row[key] == pytest.approx(whole_row[key], abs=TOLERANCE), key
    return whole_row, split_row


def grpo_trainer(spec, base_state, prompts, **memory):
    bundle = bundle_of(spec, base_state)
    trainer = GRPOTrainer(bundle, GRPOSettings(**BATCH, sampler=SDE, **memory), prompts,
                          np.zeros(len(prompts), dtype=int), [Brightness()], ["brightness"], [1.0], seed=0)
    return trainer, (bundle.transformer, trainer.reference.copy)


def test_grpo_step_in_micro_batches_trains_the_whole_batchs_weights(spec, base_state, prompts):
    def make(**memory):
        return grpo_trainer(spec, base_state, prompts, decode_batch=3, reward_batch=3, **memory)

    _, split_row = compare_steps(make, bundle_of(spec, base_state), keys=("reward", "loss", "kl"))
    # the update recomputes the rollout's log-probs in the rollout's micro-batches: the first ratio is exactly 1
    assert split_row["approx_kl"] == 0.0 and split_row["clip_frac"] == 0.0


def test_gradient_checkpointing_trains_the_same_weights(spec, base_state, prompts):
    (plain, _), (checkpointed, _) = (grpo_trainer(spec, base_state, prompts, micro_batch=4, gradient_checkpointing=on)
                                     for on in (False, True))
    assert checkpointed.bundle.transformer.gradient_checkpointing and not plain.bundle.transformer.gradient_checkpointing
    plain.step(0)
    checkpointed.step(0)
    assert largest_difference(plain.bundle, checkpointed.bundle) < TOLERANCE


def test_nft_step_in_micro_batches_trains_the_whole_batchs_weights(spec, base_state, prompts):
    def make(**memory):
        bundle = bundle_of(spec, base_state)
        method = NFTMethod(kind="nft", **BATCH, train_times=2, kl_beta=0.1, sampler=ODE, **memory)
        trainer = NFTTrainer(bundle, method, prompts, np.zeros(len(prompts), dtype=int), [Brightness()],
                             ["brightness"], [1.0], seed=0)
        return trainer, (bundle.transformer, trainer.old.transformer, trainer.reference.copy)

    compare_steps(make, bundle_of(spec, base_state), keys=("reward", "loss", "kl"))


@pytest.mark.parametrize(("estimator", "credit"), [("sampled", "element"), ("velocity_mse", "step")])
def test_opd_step_in_micro_batches_trains_the_whole_batchs_weights(spec, base_state, estimator, credit):
    pool = make_prompt_set(WorldConfig(), "text", 3, 0, "train") + make_prompt_set(WorldConfig(), "quality", 3, 0,
                                                                                   "train")

    def make(**memory):
        teachers = {"text": bundle_of(spec, base_state, perturb=1), "quality": bundle_of(spec, base_state, perturb=2)}
        anchor = bundle_of(spec, base_state, perturb=3)  # not a teacher: its own forwards over every row
        settings = OPDSettings(**BATCH, estimator=estimator, credit=credit, sampler=SDE, **memory)
        student = bundle_of(spec, base_state)
        trainer = OPDTrainer(student, settings, pool, [p.task for p in pool], teachers, anchor, 0.5, seed=0)
        return trainer, [student.transformer, anchor.transformer] + [t.transformer for t in teachers.values()]

    # whole: each target's forward takes its rows of both trained steps at once (2 steps x 8 samples x 2 for CFG);
    # velocity_mse queries one state per sample
    steps = 1 if estimator == "velocity_mse" else 2
    _, split_row = compare_steps(make, bundle_of(spec, base_state), keys=("loss", "kl", "v_mse", "mar_kl"),
                                 whole_rows=2 * 8 * steps)
    if estimator == "sampled":  # the first epoch's PPO ratio is exactly 1 with micro-batches
        assert split_row["approx_kl"] == 0.0 and split_row["clip_frac"] == 0.0


# ---------------------------------------------------------------- the SFT cold start and the evaluation
def sft_batch(spec, base_state, x0, texts, **memory):
    bundle = bundle_of(spec, base_state)
    settings = SFTColdStart(method="sft", steps=1, batch_size=4, lr=LR, **memory)
    with largest_forward(bundle.transformer) as seen, first_gradients() as grads:
        curve = sft(bundle, x0, texts, settings, seed=0, cfg_dropout=0.25, progress=False)
    return bundle, {"loss": curve[-1]["loss"], "grads": grads[0]}, seen[0]


def test_sft_in_micro_batches_samples_and_fits_like_the_whole_batch(spec, base_state):
    pool = make_prompt_set(WorldConfig(), "text", 3, 0, "train")
    teachers = {"text": bundle_of(spec, base_state, perturb=1)}
    sampler = SFTColdStart(method="sft", sampler=SDE).sampler
    args = (teachers, pool, ["text"] * len(pool), sampler, 2, 0)
    x0 = teacher_samples(*args, progress=False)
    with largest_forward(teachers["text"].transformer) as seen:
        x0_split = teacher_samples(*args, progress=False, micro_batch=2)
    assert seen[0] == 2 * 2  # CFG
    torch.testing.assert_close(x0_split, x0, rtol=1e-5, atol=1e-5)  # float summation order only
    texts = [p.text for p in pool for _ in range(2)]
    whole, whole_row, whole_rows = sft_batch(spec, base_state, x0, texts)
    split, split_row, split_rows = sft_batch(spec, base_state, x0, texts, micro_batch=2)
    assert whole_rows == 4 and split_rows == 2  # plain flow matching: no CFG rows
    assert_same_gradients(whole_row["grads"], split_row["grads"])
    assert largest_difference(whole, split) < TOLERANCE
    assert_moved(split, spec, base_state)
    assert split_row["loss"] == pytest.approx(whole_row["loss"], abs=TOLERANCE)


def test_evaluation_in_micro_batches_draws_the_same_images(spec, base_state, prompts):
    bundle = bundle_of(spec, base_state)
    sampler = copy.deepcopy(spec.evaluation.sampler)
    whole = generate(bundle, prompts, sampler, seed=0, batch_size=8)
    with largest_forward(bundle.transformer) as seen:
        split = generate(bundle, prompts, sampler, seed=0, batch_size=8, micro_batch=3, decode_batch=3)
    assert seen[0] <= 2 * 3
    assert np.abs(whole.astype(int) - split.astype(int)).max() <= 1  # uint8: at most one rounding step

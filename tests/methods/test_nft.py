"""DiffusionNFT: the loss against a hand computation, its gradient, the optimality map, the trainer on a micro model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flowopd.methods.nft import NFTTrainer, nft_loss, nft_optimality, optimality, x0_fit
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.spec import NFTMethod, SpecError, deep_merge, load_spec, resolve_raw, validate_spec
from flowopd.train.state import Checkpoints
from flowopd.train.trainer import train
from flowopd.world import make_prompt_set
from flowopd.world.grammar import WorldConfig

MICRO = Path(__file__).resolve().parents[1] / "data" / "micro.yaml"


class Brightness:
    """A toy reward with spread on any image: mean pixel value in [0, 1]."""

    name = "brightness"

    def __call__(self, images, prompts):
        return {"score": images.reshape(len(images), -1).mean(1) / 255.0}


def micro_method(**overrides) -> NFTMethod:
    values = {"kind": "nft", "group_size": 4, "prompts_per_step": 2, "steps": 3, "lr": 1e-3, "train_times": 2,
              "sampler": {"steps": 3, "noise_level": 0.0, "cfg": 3.0}, "ema": {"decay": 0.9, "every": 1}}
    return NFTMethod(**(values | overrides))


@pytest.fixture(scope="module")
def spec():
    return load_spec(MICRO)


@pytest.fixture(scope="module")
def base_state(spec):
    torch.manual_seed(0)
    return TinyBundle(tiny_model_config(spec)).eval().state_dict()


def fresh_bundle(spec, base_state):
    bundle = TinyBundle(tiny_model_config(spec))
    bundle.load_state_dict(base_state)
    return bundle.eval()


@pytest.fixture(scope="module")
def prompts():
    return make_prompt_set(WorldConfig(), "quality", 8, 0, "train")


def make_trainer(bundle, prompts, **overrides):
    return NFTTrainer(bundle, micro_method(**overrides), prompts, np.zeros(len(prompts), dtype=int), [Brightness()],
                      ["brightness"], [1.0], seed=0)


# ---------------------------------------------------------------- the math
def test_optimality_maps_clipped_advantages_onto_the_unit_interval():
    np.testing.assert_allclose(optimality(np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0]), 1.0),
                               [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(optimality(np.array([-2.0, 1.0]), 4.0), [0.25, 0.625])
    r, kept = nft_optimality([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0], 4, clip=1.0)
    np.testing.assert_array_equal(kept, [True] * 4 + [False] * 4)
    np.testing.assert_allclose(r[4:], 0.5)  # a group without spread is neutral
    assert r[0] == 0.0 and r[3] == 1.0 and r[1] < 0.5 < r[2]


def test_nft_loss_by_hand():
    """Two samples of two elements, every term written out."""
    x0 = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    noise = torch.tensor([[0.2, 0.4], [-1.0, 1.0]])
    t = torch.tensor([[0.5], [0.25]])
    x_t = (1 - t) * x0 + t * noise
    v = torch.tensor([[0.3, 1.0], [-2.0, -0.5]])
    v_old = torch.tensor([[0.1, 1.5], [-1.0, -1.0]])
    r, beta = torch.tensor([0.75, 0.0]), 0.5
    expected = []
    for i in range(2):
        terms = []
        for policy in ((1 - beta) * v_old[i] + beta * v[i], (1 + beta) * v_old[i] - beta * v[i]):
            error = (x_t[i] - t[i] * policy - x0[i]).tolist()
            weight = sum(abs(e) for e in error) / 2
            terms.append(sum(e * e for e in error) / 2 / weight)
        expected.append((r[i].item() * terms[0] + (1 - r[i].item()) * terms[1]) / beta)
    torch.testing.assert_close(nft_loss(x_t, t, x0, v, v_old, r, beta), torch.tensor(expected))


def test_nft_gradient_at_the_old_policy_is_signed_flow_matching():
    """At v = v_old, d loss / d v = (2r - 1) * 2 t (x0^(v_old) - x0) / (w D) per element (the positive and the
    negative fit pull with opposite signs), so samples at r = 1/2 give no gradient and r = 1 pulls v towards the
    flow-matching target n - x0 exactly as the positive fit alone would."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    t = torch.tensor([[0.3], [0.6], [0.9]])
    x_t = (1 - t) * x0 + t * noise
    v_old = torch.randn(3, 8, generator=g)
    v = v_old.clone().requires_grad_(True)
    r = torch.tensor([1.0, 0.5, 0.0])
    nft_loss(x_t, t, x0, v, v_old, r, beta=0.7).sum().backward()
    error = x_t - t * v_old - x0
    weight = error.abs().mean(1, keepdim=True)
    expected = (2 * r.view(-1, 1) - 1) * (-2 * t * error) / (weight * 8)
    torch.testing.assert_close(v.grad, expected)
    assert v.grad[1].abs().max() < 1e-6  # r = 1/2: no signal (up to rounding)


def test_x0_fit_weight_is_detached():
    x0, x_t, t = torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([[0.5]])
    v = torch.ones(1, 4, requires_grad=True)
    x0_fit(x_t, t, v, x0).sum().backward()
    # error = 1 - 0.5 = 0.5 everywhere, weight 0.5: d/dv (e^2 / w) / D = 2 e (-t) / (w D) = -0.5 / 4... per element
    torch.testing.assert_close(v.grad, torch.full((1, 4), 2 * 0.5 * -0.5 / 0.5 / 4))


# ---------------------------------------------------------------- the trainer
def test_nft_trainer_moves_the_weights_and_the_old_policy_trails(spec, base_state, prompts):
    bundle = fresh_bundle(spec, base_state)
    trainer = make_trainer(bundle, prompts, old_decay=0.5)
    before = {k: v.clone() for k, v in trainer.named_params.items()}
    row = trainer.step(0)
    assert row["reward"] is not None and row["loss"] is not None and row["grad_norm"] > 0
    moved = max((p - before[k]).abs().max().item() for k, p in trainer.named_params.items())
    assert moved > 0
    old = trainer.old.state_dict()
    for name, p in trainer.named_params.items():  # old = 0.5 before + 0.5 after
        torch.testing.assert_close(old[name], 0.5 * before[name] + 0.5 * p.detach())


def test_nft_climbs_a_brightness_reward(spec, base_state, prompts):
    """A reward the micro model can reach: the mean brightness of its samples rises over a few steps."""
    bundle = fresh_bundle(spec, base_state)
    trainer = make_trainer(bundle, prompts, lr=3e-3, steps=8, train_times=4)
    curve = train(trainer, 8, progress=False)
    first, last = curve[0]["reward"], np.mean([row["reward"] for row in curve[-2:]])
    assert last > first + 0.01, (first, last)


def test_nft_run_is_deterministic_and_resumes_bit_identically(tmp_path, spec, base_state, prompts):
    def run(stop_after=None, checkpoints=None):
        trainer = make_trainer(fresh_bundle(spec, base_state), prompts, old_decay=0.3, kl_beta=0.1)

        def interrupt(step):
            if stop_after is not None and step + 1 == stop_after:
                raise KeyboardInterrupt

        try:
            train(trainer, 3, checkpoints, checkpoint_every=1, progress=False, on_step=interrupt)
        except KeyboardInterrupt:
            return None
        trainer.apply_ema()
        return {k: v.detach().clone() for k, v in trainer.named_params.items()}

    straight = run()
    again = run()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    checkpoints = Checkpoints(tmp_path / "ckpt", "fingerprint")
    assert run(stop_after=2, checkpoints=checkpoints) is None
    resumed = run(checkpoints=checkpoints)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ---------------------------------------------------------------- the spec
def test_teacher_method_is_a_validated_choice():
    raw = resolve_raw(MICRO)
    spec = validate_spec(deep_merge(raw, {"teachers": {"text": {"method": {"kind": "nft", "steps": 2}}}}))
    method = spec.teachers["text"].method
    assert method.kind == "nft" and method.sampler.noise_level == 0.0  # nft samples the ODE by default
    assert method.sampler.cfg == spec.sampler.cfg  # and inherits the rest of the spec's sampler
    cases = [
        ({"kind": "nft", "sampler": {"noise_level": 0.7, "sde_window": [0, 3]}},
         "teachers.text.method.sampler: nft trains on the rollouts' final samples"),
        ({"kind": "grpo", "sampler": {"sde_window": [2, 11]}},
         "teachers.text.method.sampler: sde_window [2, 11) must lie inside the sampler's 10 steps"),
        ({"kind": "grpo", "sampler": {"sde": "cps", "noise_level": 1.5}},
         "teachers.text.method.sampler: sde cps needs noise_level (eta) in (0, 1], got 1.5"),
        ({"kind": "awr"}, "teachers.text.method"),
        ({"kind": "nft", "beta": 0.0}, "teachers.text.method.beta: Input should be greater than 0"),
    ]
    for method, message in cases:
        with pytest.raises(SpecError) as error:
            validate_spec(deep_merge(raw, {"teachers": {"text": {"method": method}}}))
        assert message in str(error.value), str(error.value)


def test_a_section_check_names_the_file_that_last_edited_the_section(tmp_path):
    # the main spec's NFT teachers set their sampler section; the child's edit is what the check refuses
    main = Path(__file__).resolve().parents[2] / "specs/flow_opd.yaml"
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {main}\nname: child\n"
                     "teachers: {text: {method: {sampler: {noise_level: 0.7, sde_window: [0, 3]}}}}\n")
    with pytest.raises(SpecError, match=r"child.yaml: teachers.text.method.sampler: nft trains on"):
        load_spec(child)

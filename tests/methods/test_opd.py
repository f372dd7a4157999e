"""Flow-OPD: the estimators' expected gradients (Monte Carlo), the loss terms, the trainer, resume, and the phase."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowopd.flow.sde import gaussian_log_prob, sde_step_mean_std, sigma_schedule, step_kl
from flowopd.methods.opd_objectives import (
    diffusion_opd_variance,
    query_steps,
    step_advantages,
    step_loss,
    step_rewards,
    velocity_mse,
    velocity_weight,
)
from flowopd.methods.opd_trainer import OPDTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.phases.data import run_data
from flowopd.phases.keys import opd_sub_spec
from flowopd.phases.opd import main as stage_main
from flowopd.phases.opd import run_opd
from flowopd.runtime.artifacts import atomic_folder, write_provenance
from flowopd.spec import (
    EmaSettings,
    OPDSettings,
    QuerySettings,
    SamplerSettings,
    deep_merge,
    load_spec,
    resolve_raw,
    validate_spec,
)
from flowopd.train.policy import step_log_prob
from flowopd.train.state import Checkpoints
from flowopd.train.streams import TIMESTEP_STREAM, step_rng
from flowopd.train.trainer import train
from flowopd.world import make_prompt_set
from flowopd.world.grammar import WorldConfig

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "data" / "micro.yaml"
SAMPLER = SamplerSettings(steps=3, shift=3.0, noise_level=0.7, cfg=3.0)
ODE = SamplerSettings(steps=3, shift=3.0, noise_level=0.0, cfg=3.0)
MICRO_OPD = {"group_size": 2, "prompts_per_step": 2, "steps": 2, "checkpoint_every": 1, "sampler": {"steps": 3},
             "ema": {"decay": 0.9, "every": 1}}


def settings(**overrides) -> OPDSettings:
    values = {"group_size": 2, "prompts_per_step": 2, "steps": 4, "lr": 1e-3, "sampler": SAMPLER,
              "ema": EmaSettings(every=1)}
    return OPDSettings(**(values | overrides))


# ---------------------------------------------------------------- the estimators on one Gaussian step
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_expected_policy_gradients_of_the_estimators(reduction):
    """Student step N(W theta + c, std^2 I), teacher N(mu_T, std^2 I). Over x' ~ student, with the trainer's own
    reward and loss functions: sampled gives E[grad PPO loss] = E[-r grad log p] = grad KL (same reduction);
    analytic's reward is constant in x', so its expected policy gradient vanishes."""
    torch.manual_seed(0)
    n, dim, params = 200_000, 6, 3
    w, c, mu_teacher = torch.randn(dim, params), torch.randn(dim), torch.randn(dim)
    theta = torch.randn(params, requires_grad=True)
    std = torch.full((n, 1), 0.8)
    mean = (w @ theta + c).expand(n, dim)
    x_next = (mean + std * torch.randn(n, dim)).detach()
    old_log_prob = gaussian_log_prob(x_next, mean.detach(), std, reduction)
    log_prob = gaussian_log_prob(x_next, mean, std, reduction)
    teacher = mu_teacher.expand(n, dim)
    kl = step_kl(mean[:1], teacher[:1], std[:1], reduction).sum()
    (grad_kl,) = torch.autograd.grad(kl, theta, retain_graph=True)

    def expected_gradient(estimator):
        rewards = step_rewards(estimator, x_next, mean.detach(), teacher, std, old_log_prob, reduction)
        loss, _ = step_loss(estimator, log_prob, old_log_prob, mean, teacher, std, rewards, 1e-4, reduction)
        return torch.autograd.grad(loss.mean(), theta, retain_graph=True)[0]

    sampled = expected_gradient("sampled")
    cosine = torch.nn.functional.cosine_similarity(sampled, grad_kl, dim=0)
    assert cosine > 0.99 and sampled.norm() == pytest.approx(grad_kl.norm().item(), rel=0.05)
    assert expected_gradient("analytic").norm() < 0.05 * grad_kl.norm()
    rewards = step_rewards("sampled", x_next, mean.detach(), teacher, std, old_log_prob, reduction)
    units = dim if reduction == "mean" else 1
    assert rewards.mean().item() == pytest.approx(-units * kl.item(), rel=0.02)  # E[r] = -KL, in nats


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_element_credit_has_the_same_expected_gradient_and_far_less_variance(reduction):
    """Credit "element" (each element's log-ratio on its own log-prob): E[grad] = grad KL as with step credit, and
    per-sample gradients whose variance does not grow with the other elements' noise (here D = 64: >10x smaller)."""
    torch.manual_seed(1)
    n, dim = 30_000, 64
    mu_teacher, std = 0.3 * torch.randn(dim), torch.full((n, 1), 0.8)
    mean = torch.zeros(n, dim, requires_grad=True)  # the student's step mean, one leaf row per sample
    x_next = (mean + std * torch.randn(n, dim)).detach()
    teacher = mu_teacher.expand(n, dim)
    (grad_kl,) = torch.autograd.grad(step_kl(mean[:1], teacher[:1], std[:1], reduction).sum(), mean)
    per_sample = {}
    for credit in ("step", "element"):
        element = credit == "element"
        old = gaussian_log_prob(x_next, mean.detach(), std, "none" if element else reduction)
        log_prob = gaussian_log_prob(x_next, mean, std, "none" if element else reduction)
        rewards = step_rewards("sampled", x_next, mean.detach(), teacher, std, old, reduction, credit)
        assert rewards.shape == ((n, dim) if element else (n,))
        loss, _ = step_loss("sampled", log_prob, old, mean, teacher, std, rewards, 1e-4, reduction)
        assert loss.shape == (n,)
        per_sample[credit] = torch.autograd.grad(loss.sum(), mean)[0]  # row i: d loss_i / d mean_i
        expected = per_sample[credit].mean(0)
        cosine = torch.nn.functional.cosine_similarity(expected, grad_kl[0], dim=0)
        assert cosine > 0.99 and expected.norm() == pytest.approx(grad_kl[0].norm().item(), rel=0.05)
    variance = {credit: g.var(0).sum().item() for credit, g in per_sample.items()}
    assert variance["element"] < variance["step"] / 10


def test_element_credit_refuses_reward_to_go():
    with pytest.raises(ValueError, match="reward_to_go .* needs credit: step"):
        OPDSettings(credit="element", reward_to_go=True)
    with pytest.raises(ValueError, match="credit"):
        step_rewards("sampled", torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 1.0, credit="pixel")


def test_analytic_grad_loss_is_the_step_kl_and_mar_adds_weight_times_kl():
    mean = torch.randn(4, 3, 2, 2, requires_grad=True)
    teacher, anchor, std = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.full((4, 1, 1, 1), 0.3)
    log_prob = gaussian_log_prob(torch.randn(4, 3, 2, 2), mean, std)
    loss, terms = step_loss("analytic_grad", log_prob, log_prob.detach(), mean, teacher, std, None, 1e-4)
    assert terms["ratio"] is None and terms["mar_kl"] is None
    grad = torch.autograd.grad(loss.sum(), mean, retain_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(step_kl(mean, teacher, std).sum(), mean)[0])
    with_mar, terms = step_loss("analytic_grad", log_prob, log_prob.detach(), mean, teacher, std, None, 1e-4,
                                mean_anchor=anchor, mar_weight=0.3)
    torch.testing.assert_close(with_mar - loss, 0.3 * step_kl(mean, anchor, std))
    with pytest.raises(ValueError, match="no per-step reward"):
        step_rewards("analytic_grad", mean, mean, teacher, std)


# ---------------------------------------------------------------- DiffusionOPD's and DanceOPD's objectives
@pytest.mark.parametrize(("estimator", "noise_level"), [("analytic_grad", 0.7), ("diffusion_opd", 0.0),
                                                        ("diffusion_opd", 0.7), ("velocity_mse", 0.0)])
def test_each_estimator_weighs_the_velocity_error_as_documented(estimator, noise_level):
    """L_t = velocity_weight(t) * mean_d (v_S - v_T)^2 at every trainable step of the tiny spec's grid, with the
    trainer's own loss functions; diffusion_opd on the SDE is the step KL times (s - s')."""
    generator = torch.Generator().manual_seed(3)
    x, v_student, v_teacher = (torch.randn(4, 3, 4, 4, generator=generator) for _ in range(3))
    sigmas = sigma_schedule(10, 3.0).tolist()
    error = velocity_mse(v_student, v_teacher)
    for t in range(9):
        s, s_next = sigmas[t], sigmas[t + 1]
        if estimator == "velocity_mse":
            loss = error
        else:
            mean, std = sde_step_mean_std(x, v_student, s, s_next, noise_level)
            mean_teacher, _ = sde_step_mean_std(x, v_teacher, s, s_next, noise_level)
            loss, terms = step_loss(estimator, None, None, mean, mean_teacher, std, None, 1e-4,
                                    variance=diffusion_opd_variance(s, s_next, noise_level))
            assert terms["ratio"] is None
            if estimator == "diffusion_opd" and noise_level > 0:
                torch.testing.assert_close(loss, (s - s_next) * step_kl(mean, mean_teacher, std))
        torch.testing.assert_close(loss, velocity_weight(estimator, s, s_next, noise_level) * error, rtol=1e-4,
                                   atol=0)
    with pytest.raises(ValueError, match="needs the variance"):
        step_loss("diffusion_opd", None, None, x, x, 1.0, None, 1e-4)


@pytest.mark.parametrize("draw", ["uniform", "beta"])
def test_velocity_mse_queries_its_range_as_drawn_and_its_expected_gradient_averages_the_steps(draw):
    """DanceOPD's one state per rollout: the draws follow the query distribution (uniform, or Beta(5, 2) over the
    range, CDF 6u^5 - 5u^6), so E[grad] over rollouts = sum_t p_t grad mse_t (a toy linear student per step)."""
    n, steps, (lo, hi) = 200_000, 10, (3, 9)
    q = query_steps(np.random.default_rng(0), n, steps, QuerySettings(steps=(lo, hi), draw=draw))
    assert q.min() >= lo and q.max() <= hi
    width = hi - lo + 1
    edges = np.arange(width + 1) / width
    expected = np.full(width, 1 / width) if draw == "uniform" else np.diff(6 * edges**5 - 5 * edges**6)
    frequencies = np.bincount(q - lo, minlength=width) / n
    np.testing.assert_allclose(frequencies, expected, atol=0.005)
    torch.manual_seed(0)
    dim, params = 6, 3
    slopes, targets = torch.randn(steps, dim, params), torch.randn(steps, dim)
    theta = torch.randn(params, requires_grad=True)
    index = torch.as_tensor(q)
    loss = velocity_mse(slopes[index] @ theta, targets[index]).mean()
    (empirical,) = torch.autograd.grad(loss, theta)
    weights = torch.zeros(steps, dtype=torch.float64)
    weights[lo:hi + 1] = torch.as_tensor(expected)
    exact = sum(w * torch.autograd.grad(velocity_mse(slopes[t] @ theta, targets[t]).sum(), theta)[0]
                for t, w in enumerate(weights.float()) if w > 0)
    assert torch.nn.functional.cosine_similarity(empirical, exact, dim=0) > 0.999
    assert empirical.norm() == pytest.approx(exact.norm().item(), rel=0.02)


def test_the_query_range_defaults_to_the_low_noise_half_and_is_checked():
    q = query_steps(np.random.default_rng(1), 10_000, 10)
    assert set(q.tolist()) == {5, 6, 7, 8, 9}
    with pytest.raises(ValueError, match=r"not within the sampler's steps 0 .. 2"):
        query_steps(np.random.default_rng(1), 4, 3, QuerySettings(steps=(1, 3)))


def test_reward_to_go_and_normalised_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(step_advantages(rewards), rewards)
    torch.testing.assert_close(step_advantages(rewards, reward_to_go=True), torch.tensor([[9.0, 12.0], [8.0, 10.0],
                                                                                        [5.0, 6.0]]))
    normalised = step_advantages(rewards, reward_to_go=True, normalize=True)
    half_spreads = torch.tensor([[1.5], [1.0], [0.5]])  # population std of each step's pair
    torch.testing.assert_close(normalised, torch.tensor([[-1.0, 1.0]]) * half_spreads / (half_spreads + 1e-4))


# ---------------------------------------------------------------- the trainer on a micro tiny bundle
@pytest.fixture(scope="module")
def spec():
    torch.set_num_threads(1)
    return load_spec(MICRO)


@pytest.fixture(scope="module")
def states(spec):
    """A random micro base and two teachers: the base with perturbed transformer weights."""
    torch.manual_seed(0)
    base = TinyBundle(tiny_model_config(spec)).eval()
    out = {"base": base.state_dict()}
    for i, name in enumerate(("text", "quality")):
        teacher = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in teacher.transformer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        out[name] = teacher.state_dict()
    return out


def bundle_of(spec, state) -> TinyBundle:
    bundle = TinyBundle(tiny_model_config(spec))
    bundle.load_state_dict(state)
    return bundle.eval()


@pytest.fixture(scope="module")
def pool():
    prompts = make_prompt_set(WorldConfig(), "text", 3, 0, "train") + make_prompt_set(WorldConfig(), "quality", 3, 0,
                                                                                       "train")
    return prompts, [p.task for p in prompts]


def make_trainer(spec, states, pool, anchor=None, mar_weight=0.0, teachers=None, **overrides):
    prompts, routes = pool
    teachers = teachers or {name: bundle_of(spec, states[name]) for name in ("text", "quality")}
    return OPDTrainer(bundle_of(spec, states["base"]), settings(**overrides), prompts, routes, teachers, anchor,
                      mar_weight, seed=0)


@pytest.mark.parametrize(("estimator", "credit", "sampler"), [
    ("sampled", "step", SAMPLER), ("analytic", "step", SAMPLER), ("analytic_grad", "step", SAMPLER),
    ("sampled", "element", SAMPLER), ("diffusion_opd", "step", ODE), ("diffusion_opd", "step", SAMPLER),
    ("velocity_mse", "step", ODE), ("velocity_mse", "step", SAMPLER)])
def test_two_steps_train_and_log_finite_rows(spec, states, pool, estimator, credit, sampler):
    trainer = make_trainer(spec, states, pool, estimator=estimator, reward_to_go=estimator == "analytic",
                           credit=credit, sampler=sampler)
    before = [p.detach().clone() for p in trainer.params]
    curve = train(trainer, 2, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    sde = sampler.noise_level > 0
    for row in curve:
        assert {"reward", "kl", "kl_text", "kl_quality", "v_mse", "mar_kl", "loss", "clip_frac", "grad_norm",
                "rollout_s", "teacher_s", "train_s"} <= set(row)
        assert row["v_mse"] > 0 and row["mar_kl"] is None
        assert (row["kl"] is not None and row["kl"] > 0) == sde  # no Gaussian steps on the ODE
        assert all(np.isfinite(row[k]) for k in ("reward", "v_mse", "loss", "grad_norm"))
        assert (row["clip_frac"] is None) == (estimator not in ("sampled", "analytic"))
    if estimator in ("analytic_grad", "diffusion_opd", "velocity_mse"):  # minus the divergence it differentiates
        assert curve[0]["reward"] == -(curve[0]["kl"] if estimator == "analytic_grad" else curve[0]["policy_loss"])


@pytest.mark.parametrize("credit", ["step", "element"])
def test_a_teacher_equal_to_the_student_gives_zero_reward_and_kl(spec, states, pool, credit):
    student_copy = bundle_of(spec, states["base"])
    trainer = make_trainer(spec, states, pool, teachers={"text": student_copy, "quality": student_copy},
                           credit=credit)
    rollout = trainer.rollout(0)
    steps = [0, 1]
    targets = {t: trainer.targets(rollout, t, 3.0) for t in steps}
    common = {"cfg": 3.0, "noise_level": 0.7, "reduction": "mean"}
    rewards = trainer.rewards(rollout, steps, targets, common)
    latents = rollout.trajectory.latents[0]
    assert rewards.shape == ((2, *latents.shape) if credit == "element" else (2, len(latents)))
    assert rewards.abs().max() < 1e-3  # nats; log p_teacher = log p_student at every x'
    row = trainer.step(0)
    assert row["kl"] == pytest.approx(0.0, abs=1e-10) and abs(row["reward"]) < 1e-6


@pytest.mark.parametrize(("estimator", "sampler"), [("diffusion_opd", ODE), ("velocity_mse", ODE),
                                                    ("velocity_mse", SAMPLER)])
def test_a_teacher_equal_to_the_student_gives_zero_loss(spec, states, pool, estimator, sampler):
    student_copy = bundle_of(spec, states["base"])
    trainer = make_trainer(spec, states, pool, teachers={"text": student_copy, "quality": student_copy},
                           estimator=estimator, sampler=sampler)
    row = trainer.step(0)
    assert row["loss"] == row["v_mse"] == row["reward"] == 0.0 and row["grad_norm"] == 0.0
    assert (row["kl"] == 0.0) if sampler.noise_level > 0 else row["kl"] is None


def assert_applied(trainer, expected, rtol, atol):
    """The update's gradients (left in .grad, grad_clip None) are `expected`, and not all zero."""
    pairs = [(p.grad, g) for p, g in zip(trainer.params, expected) if g is not None]
    assert pairs and sum(g.abs().sum() for _, g in pairs) > 0
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def routed_velocities(trainer, rollout, x, sigma):
    """The routed teachers' velocities at x, one forward per sample (sigma: one per row)."""
    return torch.cat([trainer.teachers[trainer.teacher_names[k]](x[i:i + 1], sigma[i:i + 1], rollout.cond.index([i]),
                                                                3.0) for i, k in enumerate(rollout.tasks)])


def test_diffusion_opd_update_applies_the_gradient_of_the_transition_mean_gap(spec, states, pool):
    """On the ODE: mean over steps and samples of 0.5 mean_d (mu_S - mu_T)^2, mu = x + (s' - s) v."""
    trainer = make_trainer(spec, states, pool, estimator="diffusion_opd", sampler=ODE, grad_clip=None)
    rollout = trainer.rollout(0)
    traj = rollout.trajectory
    assert traj.log_probs is None  # an ODE rollout
    losses = []
    for t in range(2):
        x, s, s_next = traj.latents[t], traj.sigmas[t].expand(len(rollout.tasks)), traj.sigmas[t + 1].item()
        gap = (s_next - s[0]) * (trainer.bundle.velocity(x, s, rollout.cond, cfg=3.0)
                                 - routed_velocities(trainer, rollout, x, s))
        losses.append((0.5 * gap**2).mean())
    expected = torch.autograd.grad(torch.stack(losses).mean(), trainer.params, allow_unused=True)
    trainer.update(rollout, 0)
    assert_applied(trainer, expected, rtol=1e-3, atol=1e-8)  # the expectation's teacher forwards are per sample


def test_velocity_mse_update_applies_the_gradient_at_each_rollouts_drawn_state(spec, states, pool):
    """DanceOPD: one state x_q per rollout, q drawn (seeded by the step) from the low-noise half, plain MSE."""
    trainer = make_trainer(spec, states, pool, estimator="velocity_mse", sampler=ODE, grad_clip=None)
    rollout = trainer.rollout(0)
    traj, batch = rollout.trajectory, len(rollout.tasks)
    q = torch.as_tensor(query_steps(step_rng(0, TIMESTEP_STREAM, 0), batch, 3))
    assert set(q.tolist()) <= {1, 2}
    x, sigma = traj.latents[q, torch.arange(batch)], traj.sigmas[q]
    v_student = trainer.bundle.velocity(x, sigma, rollout.cond, cfg=3.0)
    loss = ((v_student - routed_velocities(trainer, rollout, x, sigma)) ** 2).mean()
    expected = torch.autograd.grad(loss, trainer.params, allow_unused=True)
    row = trainer.query_update(rollout, 0)
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_applied(trainer, expected, rtol=1e-3, atol=1e-8)  # the expectation's teacher forwards are per sample


def test_analytic_grad_update_applies_the_gradient_of_the_step_kl(spec, states, pool):
    trainer = make_trainer(spec, states, pool, estimator="analytic_grad", grad_clip=None)
    rollout = trainer.rollout(0)
    traj, teacher = rollout.trajectory, trainer.teachers
    losses = []
    for t in range(2):
        sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
        _, mean, std = step_log_prob(trainer.bundle, traj.latents[t], traj.latents[t + 1], sigma, sigma_next,
                                     rollout.cond, cfg=3.0, noise_level=0.7, reduction="mean")
        teacher_mean = torch.empty_like(mean)
        for k, name in enumerate(trainer.teacher_names):
            rows = torch.as_tensor(np.flatnonzero(rollout.tasks == k))
            teacher_mean[rows] = step_log_prob(trainer.bundle, traj.latents[t][rows], traj.latents[t + 1][rows],
                                               sigma, sigma_next, rollout.cond.index(rows), cfg=3.0, noise_level=0.7,
                                               reduction="mean", velocity_fn=teacher[name])[1]
        losses.append(step_kl(mean, teacher_mean, std).mean())
    expected = torch.autograd.grad(torch.stack(losses).mean(), trainer.params, allow_unused=True)
    trainer.update(rollout, 0)
    assert_applied(trainer, expected, rtol=1e-4, atol=1e-9)


def test_mar_adds_exactly_weight_times_its_kl_and_reuses_the_anchor_teacher(spec, states, pool):
    teachers = {name: bundle_of(spec, states[name]) for name in ("text", "quality")}
    rows = {w: make_trainer(spec, states, pool, teachers["quality"], w, teachers, estimator="analytic_grad").step(0)
            for w in (0.0, 0.5)}  # analytic_grad: a small policy term, so float32 sums stay exact enough
    assert rows[0.0]["mar_kl"] is None and rows[0.5]["mar_kl"] > 0
    assert rows[0.0]["policy_loss"] == rows[0.5]["policy_loss"]
    assert rows[0.5]["loss"] - rows[0.0]["loss"] == pytest.approx(0.5 * rows[0.5]["mar_kl"], rel=1e-5, abs=1e-12)
    trainer = make_trainer(spec, states, pool, teachers["quality"], 0.5, teachers)
    assert trainer.anchor_alias == "quality"
    rollout = trainer.rollout(0)
    teacher_mean, anchor_mean, _ = trainer.targets(rollout, 1, 3.0)
    traj, quality = rollout.trajectory, rollout.tasks == trainer.teacher_names.index("quality")
    assert quality.any() and (~quality).any()
    assert torch.equal(anchor_mean[quality], teacher_mean[quality])
    direct = step_log_prob(trainer.bundle, traj.latents[1], traj.latents[2], traj.sigmas[1].item(),
                           traj.sigmas[2].item(), rollout.cond, cfg=3.0, noise_level=0.7, reduction="mean",
                           velocity_fn=trainer.teachers["quality"])[1]
    torch.testing.assert_close(anchor_mean, direct, rtol=1e-5, atol=1e-6)


def test_trainer_rejects_bad_inputs(spec, states, pool):
    with pytest.raises(ValueError, match=r"routed to \['quality'\]"):
        make_trainer(spec, states, pool, teachers={"text": bundle_of(spec, states["text"])})
    with pytest.raises(ValueError, match="SDE sampler"):
        make_trainer(spec, states, pool, sampler=SamplerSettings(steps=3, noise_level=0.0))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("estimator", ["sampled", "velocity_mse"])
def test_interrupted_run_resumes_bit_identically(tmp_path, spec, states, pool, estimator):
    def run(checkpoints, stop_after=None):
        trainer = make_trainer(spec, states, pool, anchor=bundle_of(spec, states["quality"]), mar_weight=0.1,
                               estimator=estimator)

        def on_step(step):
            if step == stop_after:
                raise Interrupt

        return trainer, train(trainer, 4, checkpoints, checkpoint_every=2, progress=False, on_step=on_step)

    reference, reference_curve = run(None)
    checkpoints = Checkpoints(tmp_path / "ckpt", "fingerprint")
    with pytest.raises(Interrupt):
        run(checkpoints, stop_after=2)
    assert torch.load(checkpoints.path, weights_only=False)["step"] == 2
    resumed, resumed_curve = run(checkpoints)
    assert all(torch.equal(a, b) for a, b in zip(reference.params, resumed.params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reference.ema.shadow, resumed.ema.shadow, strict=True))
    assert [r["reward"] for r in resumed_curve] == [r["reward"] for r in reference_curve]


# ---------------------------------------------------------------- the phase
@pytest.fixture(scope="module")
def phase_inputs(tmp_path_factory, spec, states):
    root = tmp_path_factory.mktemp("opd")
    run_data(spec, root / "data")
    save_artifact(bundle_of(spec, states["base"]), root / "base")
    for name in ("text", "objects", "quality"):
        save_artifact(bundle_of(spec, states["quality" if name == "objects" else name]), root / name)
    return root


def save_artifact(bundle, folder):
    """A model folder as a phase writes it: the weights and a meta.json recording every file's sha256."""
    with atomic_folder(folder) as staging:
        bundle.save(staging)
        write_provenance(staging, "base", {})


def micro_spec(**sections):
    return validate_spec(deep_merge(resolve_raw(MICRO), {"opd": MICRO_OPD, **sections}))


@pytest.mark.parametrize("opd", [{}, {"estimator": "velocity_mse", "sampler": {"steps": 3, "noise_level": 0.0}}],
                         ids=["sampled", "velocity_mse"])
def test_run_opd_writes_the_student_and_its_curve(phase_inputs, opd):
    root, spec = phase_inputs, micro_spec(opd=MICRO_OPD | opd)
    dirs = {name: root / name for name in ("text", "objects", "quality")}
    run_opd(spec, root / "base", root / "base", dirs, root / "data", root / "student", root / "curve.csv",
            progress=False)
    out = root / "student"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model_config.json", "curve.csv", "meta.json",
                                               "spec.json"}
    assert not (root / "student.ckpt").exists()
    header = (out / "curve.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "reward", "kl"]
    assert {"kl_objects", "kl_quality", "kl_text", "v_mse", "mar_kl"} <= set(header)
    assert (root / "curve.csv").read_text() == (out / "curve.csv").read_text()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["phase"] == "opd" and meta["routing"] == {"objects": 8, "quality": 8, "text": 8}
    assert meta["estimator"] == spec.opd.estimator
    assert meta["anchor"] == "quality" and set(meta["teachers"]) == {"objects", "quality", "text"}
    assert json.loads((out / "spec.json").read_text()) == opd_sub_spec(spec)
    trained, base = load_file(out / "model.safetensors"), load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in trained if k.startswith("transformer."))
    assert all(torch.equal(trained[k], base[k]) for k in trained if k.startswith("text_encoder."))
    TinyBundle.load(out)


def test_stage_command_line_with_the_base_as_anchor_and_default_teacher(phase_inputs, tmp_path):
    root = phase_inputs
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"extends: {MICRO}\nopd: {json.dumps(MICRO_OPD)}\nmar: {{anchor: base}}\n"
                         "router: {rules: [{task: text, teacher: text}], default: base}\n")
    command = ["--spec", str(spec_file), "--init", str(root / "base"), "--base", str(root / "base"),
               "--data", str(root / "data"), "--out", str(tmp_path / "student"), "--no-progress"]
    with pytest.raises(SystemExit, match="pass --teacher text=DIR"):
        stage_main(command)
    stage_main([*command, "--teacher", f"text={root / 'text'}"])
    meta = json.loads((tmp_path / "student" / "meta.json").read_text())
    assert meta["routing"] == {"text": 8, "base": 16} and meta["anchor"] == "base"
    assert set(meta["teachers"]) == {"text", "base"}


def test_targets_batched_over_trained_steps_equal_one_step_at_a_time(spec, states, pool):
    teachers = {name: bundle_of(spec, states[name]) for name in ("text", "quality")}
    trainer = make_trainer(spec, states, pool, teachers["quality"], 0.5, teachers)
    rollout, steps = trainer.rollout(0), [0, 1, 2]
    batched = trainer.step_targets(rollout, steps, 3.0)
    for t in steps:
        alone = trainer.step_targets(rollout, [t], 3.0)[t]
        for got, want in zip(batched[t], alone):  # float summation may differ with the forward's batch size
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""The estimators reference_kl and gkd against the Flow-OPD reference code, transcribed: CostaliyA/Flow-OPD at
434ab16, scripts/train_sd3_opd_mix.py (training loop: lines 1666-1688 kl_only, 1729-1736 gkd, 1745-1767 the loss)
and flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (the SDE step), with its config values (config/base.py,
config/grpo.py mix_opd_8gpu). The transcriptions keep the reference code's names and expressions."""

import math

import pytest
import torch
from test_opd import bundle_of, make_trainer, pool, spec, states  # noqa: F401  (the fixtures too)

from flowopd.flow.sde import gaussian_log_prob, noise_scale, sde_step, sigma_schedule, step_kl
from flowopd.methods.opd_objectives import (
    diffusion_opd_variance,
    reference_divergence,
    step_loss,
    velocity_mse,
    velocity_weight,
)
from flowopd.spec import OPDSettings, ReferenceKLSettings
from flowopd.train.policy import step_log_prob
from flowopd.train.trainer import train


class Train(dict):
    """config.train of the reference code (an ml_collections ConfigDict: both `.key` and `.get`)."""

    __getattr__ = dict.__getitem__


class Config:
    def __init__(self, **train):
        # config/base.py defaults and config/grpo.py mix_opd_8gpu, the keys the update reads
        self.train = Train({"reward_mode": "kl_only", "kl_reward_level": "step_wise", "kl_scale": -1, "kl_norm": "none",
                            "adv_clip_max": 5, "clip_range": 1e-4, "beta": 0.04} | train)


# ---------------------------------------------------------------- the reference code, transcribed
class Scheduler:
    """The part of diffusers' FlowMatchEulerDiscreteScheduler that sde_step_with_logprob reads."""

    def __init__(self, sigmas):
        self.sigmas = sigmas
        self.timesteps = sigmas[:-1] * 1000

    def index_for_timestep(self, timestep):
        indices = (self.timesteps == timestep).nonzero()
        return indices[1 if len(indices) > 1 else 0].item()


def sde_step_with_logprob(self, model_output, timestep, sample, noise_level=0.7, prev_sample=None):
    """sd3_sde_with_logprob.py, sde_type 'sde', prev_sample given (the training loop's call)."""
    # bf16 can overflow here when compute prev_sample_mean, we must convert all variable to fp32
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()

    step_index = [self.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    sigma = self.sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = self.sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = self.sigmas[1].item()
    dt = sigma_prev - sigma

    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level

    # our sde
    prev_sample_mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + model_output * (
        1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt))**2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    # mean along all but batch dimension
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def log_prob_of(prev_sample, prev_sample_mean, std_dev_t, dt):
    """The log_prob lines of sde_step_with_logprob alone, in the inputs' dtype (the step casts to fp32)."""
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt))**2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def reference_loss(config, sample, j, log_prob, prev_sample_mean, std_dev_t, prev_sample_mean_ref_lora,
                   prev_sample_mean_ref_base):
    """One trained step j of train_sd3_opd_mix.py (lines 1666-1688, 1729-1736, 1745-1767; long lines wrapped, the
    expressions as written): the `reward_mode` branch (kl_only or gkd; kl_norm 'none', whose normalisations are then
    skipped) and the loss with beta times kl_loss (MAR). -> (loss, ratio or None)."""
    reward_mode = config.train.get("reward_mode", "task_only")
    ratio = None
    if reward_mode == "kl_only":
        # advantages = kl_scale * kl_reward (negative KL as timestep-level advantage)
        if config.train.get("kl_reward_level") == "step_wise" and config.train.get("kl_scale", 0) != 0:
            kl_reward = ((prev_sample_mean - prev_sample_mean_ref_lora) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
                2 * std_dev_t ** 2)
            kl_reward = kl_reward.squeeze(-1).squeeze(-1)
            assert config.train.get("kl_norm", "none") == "none"
            advantages = config.train.kl_scale * kl_reward
            advantages = torch.clamp(
                advantages,
                -config.train.adv_clip_max,
                config.train.adv_clip_max,
            )
    elif reward_mode == "gkd":
        # GKD: directly use mean(kl_reward) as loss, no policy loss / ratio
        if prev_sample_mean_ref_lora is not None:
            kl_reward_gkd = ((prev_sample_mean - prev_sample_mean_ref_lora) ** 2).mean(dim=(1, 2, 3),
                                                                                         keepdim=True) / (
                2 * std_dev_t ** 2)
        gkd_loss = torch.mean(kl_reward_gkd)

    if reward_mode == "gkd":
        loss = gkd_loss
        if config.train.beta > 0:
            kl_loss = ((prev_sample_mean - prev_sample_mean_ref_base) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
                2 * std_dev_t ** 2)
            kl_loss = torch.mean(kl_loss)
            loss = gkd_loss + config.train.beta * kl_loss
    else:
        ratio = torch.exp(log_prob - sample["log_probs"][:, j])
        unclipped_loss = -advantages * ratio
        clipped_loss = -advantages * torch.clamp(
            ratio,
            1.0 - config.train.clip_range,
            1.0 + config.train.clip_range,
        )
        policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
        if config.train.beta > 0:
            kl_loss = ((prev_sample_mean - prev_sample_mean_ref_base) ** 2).mean(dim=(1,2,3), keepdim=True) / (
                2 * std_dev_t ** 2)
            kl_loss = torch.mean(kl_loss)
            loss = policy_loss + config.train.beta * kl_loss
        else:
            loss = policy_loss
    return loss, ratio


# ---------------------------------------------------------------- their SDE step is ours
def test_their_sde_step_is_ours_and_std_dev_t_is_our_std_before_sqrt_minus_dt():
    """prev_sample_mean = our step mean, std_dev_t = sd(s) (= our std / sqrt(s - s'), diffusion_opd_variance's
    root), log_prob = our "mean"-reduced log-prob, at every trainable step of a 10-step shift-3 grid, s = 1 included."""
    generator = torch.Generator().manual_seed(0)
    sigmas = sigma_schedule(10, 3.0)  # fp32, as diffusers'
    scheduler = Scheduler(sigmas)
    latents, noise_pred, noise = (torch.randn(3, 4, 5, 5, generator=generator) for _ in range(3))
    for j in range(9):
        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        mean, std = sde_step(latents, noise_pred, s, s_next, 0.7, noise=noise)[2:]
        next_latents = mean + std * noise
        timesteps = scheduler.timesteps[j].expand(3)
        _, their_log_prob, prev_sample_mean, std_dev_t = sde_step_with_logprob(
            scheduler, noise_pred, timesteps, latents, prev_sample=next_latents, noise_level=0.7)
        _, log_prob, ours_mean, ours_std = sde_step(latents, noise_pred, s, s_next, 0.7, prev_sample=next_latents)
        torch.testing.assert_close(ours_mean, prev_sample_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(noise_scale(torch.tensor(s), torch.tensor(s_next), 0.7).expand_as(std_dev_t),
                                   std_dev_t, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours_std / math.sqrt(s - s_next), std_dev_t, rtol=1e-5, atol=0)
        torch.testing.assert_close(diffusion_opd_variance(s, s_next, 0.7).expand_as(std_dev_t), std_dev_t**2,
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(log_prob, their_log_prob, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the losses and gradients, fp64
OFFSETS = torch.tensor([0.0, 5e-5, -3e-4, 3e-4], dtype=torch.float64)  # old log-probs: ratios 1, inside, above, below


def step_inputs(seed: int, gap: float):
    """One trained step of 4 samples in fp64: the student's mean (the leaf), the teacher's at `gap` times 0.2, 1, 2,
    4 unit noise from it (so D spans the clamp at 5 when gap > 1), the anchor's, std_dev_t = sd(s) per sample
    (s = 0.6, s' = 0.45) and the stored x'."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    sigma, sigma_prev = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    std_dev_t = (torch.sqrt(sigma / (1 - sigma)) * 0.7).expand(4, 1, 1, 1)
    dt = (sigma_prev - sigma).expand(4, 1, 1, 1)
    prev_sample_mean = randn(4, 3, 4, 4).requires_grad_(True)
    spread = gap * torch.tensor([0.2, 1.0, 2.0, 4.0], dtype=torch.float64).reshape(4, 1, 1, 1)
    teacher = prev_sample_mean.detach() + spread * randn(4, 3, 4, 4)
    anchor = prev_sample_mean.detach() + 0.3 * randn(4, 3, 4, 4)
    prev_sample = prev_sample_mean.detach() + std_dev_t * torch.sqrt(-dt) * randn(4, 3, 4, 4)
    return prev_sample_mean, teacher, anchor, std_dev_t, dt, prev_sample


def ours(estimator, prev_sample_mean, teacher, anchor, std_dev_t, dt, prev_sample, kl_scale, mar_weight):
    """Our estimator on the same step: log-probs (the stored ones OFFSETS off) from our SDE code with our step std
    std_dev_t sqrt(-dt), the variance std_dev_t^2. -> (the step's loss, terms)."""
    std = std_dev_t * torch.sqrt(-dt)
    log_prob = gaussian_log_prob(prev_sample, prev_sample_mean, std, "mean")
    old = log_prob.detach() + OFFSETS
    loss, terms = step_loss(estimator, log_prob, old, prev_sample_mean, teacher, std, None, 1e-4, "mean", anchor,
                            mar_weight, std_dev_t**2, kl_scale, 5.0)
    return loss.mean(), terms


def theirs(config, prev_sample_mean, teacher, anchor, std_dev_t, dt, prev_sample):
    """Their step: log-probs from their SDE code's expression, the stored ones OFFSETS off. -> (loss, ratio)."""
    log_prob = log_prob_of(prev_sample, prev_sample_mean, std_dev_t, dt)
    sample = {"log_probs": (log_prob.detach() + OFFSETS)[:, None]}  # (B, T), T = 1
    return reference_loss(config, sample, 0, log_prob, prev_sample_mean, std_dev_t, teacher, anchor)


@pytest.mark.parametrize(("gap", "kl_scale"), [(0.3, -1.0), (3.0, -1.0), (3.0, 0.5)])
def test_reference_kl_is_their_kl_only_update_loss_and_gradient(gap, kl_scale):
    """Their kl_only step with MAR (beta 0.04) against step_loss("reference_kl") with mar_weight 0.04: loss and
    gradient to 1e-10 in fp64; kl_scale -1 (theirs) with and without the advantage clamp at 5 active, and a positive
    kl_scale; ratios inside and on both sides of 1 +- 1e-4."""
    step = step_inputs(0, gap)
    mean, teacher, anchor, std_dev_t = step[:4]
    their_loss, their_ratio = theirs(Config(kl_scale=kl_scale), *step)
    (their_grad,) = torch.autograd.grad(their_loss, mean)
    loss, terms = ours("reference_kl", *step, kl_scale, 0.04)
    (grad,) = torch.autograd.grad(loss, mean, retain_graph=True)
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, their_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(terms["ratio"], their_ratio, rtol=0, atol=1e-12)
    assert ((their_ratio - 1).abs() > 1e-4).sum() == 2  # the PPO clip binds on one side or the other
    divergence = reference_divergence(mean, teacher, std_dev_t**2).detach()
    clamped = (kl_scale * divergence).abs() > 5
    assert (clamped.any() and not clamped.all()) if gap > 1 else not clamped.any()
    torch.testing.assert_close(terms["advantages"].detach(), (kl_scale * divergence).clamp(-5, 5), rtol=0,
                               atol=1e-12)
    # what the check would catch: the advantage detached, or each advantage against its own ratio only
    ratio, mar = terms["ratio"], 0.04 * reference_divergence(mean, anchor, std_dev_t**2).mean()
    for advantages, pairs in ((terms["advantages"].detach()[:, None], True), (terms["advantages"], False)):
        ratios = ratio[None] if pairs else ratio
        variant = torch.maximum(-advantages * ratios, -advantages * ratios.clamp(1 - 1e-4, 1 + 1e-4)).mean() + mar
        (variant_grad,) = torch.autograd.grad(variant, mean, retain_graph=True)
        assert (variant_grad - their_grad).abs().max() > 1e-3 * their_grad.abs().max()


def test_gkd_is_their_gkd_update_loss_and_gradient():
    """Their reward_mode gkd with MAR (beta 0.04): mean D to the teacher + beta mean D to the anchor."""
    step = step_inputs(1, 3.0)
    mean, teacher, _, std_dev_t, dt = step[:5]
    their_loss, ratio = theirs(Config(reward_mode="gkd"), *step)
    assert ratio is None
    (their_grad,) = torch.autograd.grad(their_loss, mean)
    loss, terms = ours("gkd", *step, -1.0, 0.04)
    (grad,) = torch.autograd.grad(loss, mean)
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, their_grad, rtol=0, atol=1e-10)
    assert terms["ratio"] is None and terms["advantages"] is None
    # D is the exact step KL (averaged over elements) times s - s' = 0.15
    kl = step_kl(mean.detach(), teacher, std_dev_t * torch.sqrt(-dt), "mean")
    torch.testing.assert_close(terms["policy"].detach().float(), kl * 0.15, rtol=1e-5, atol=0)


def test_gkd_weighs_the_velocity_error_as_documented():
    generator = torch.Generator().manual_seed(3)
    x, v_student, v_teacher = (torch.randn(4, 3, 4, 4, generator=generator) for _ in range(3))
    sigmas = sigma_schedule(10, 3.0).tolist()
    for t in range(9):
        s, s_next = sigmas[t], sigmas[t + 1]
        mean = sde_step(x, v_student, s, s_next, 0.7)[2]
        mean_teacher = sde_step(x, v_teacher, s, s_next, 0.7)[2]
        loss, _ = step_loss("gkd", None, None, mean, mean_teacher, None, None, 1e-4,
                            variance=diffusion_opd_variance(s, s_next, 0.7))
        torch.testing.assert_close(loss, velocity_weight("gkd", s, s_next, 0.7) * velocity_mse(v_student, v_teacher),
                                   rtol=1e-4, atol=0)


# ---------------------------------------------------------------- the spec options
def test_reference_settings_are_checked_and_left_out_of_the_dump_when_unset():
    assert "reference_kl" not in OPDSettings().model_dump()  # older specs keep their hash
    settings = OPDSettings(estimator="reference_kl", reference_kl=ReferenceKLSettings(kl_scale=-2.0))
    assert settings.model_dump()["reference_kl"] == {"kl_scale": -2.0, "adv_clip": 5.0}
    with pytest.raises(ValueError, match="reference_kl applies to estimator reference_kl, not gkd"):
        OPDSettings(estimator="gkd", reference_kl=ReferenceKLSettings())
    with pytest.raises(ValueError, match="kl_scale 0 makes every advantage 0"):
        ReferenceKLSettings(kl_scale=0.0)
    with pytest.raises(ValueError, match="needs sampler.logprob_reduction mean"):
        OPDSettings(estimator="gkd", sampler={"logprob_reduction": "sum"})
    with pytest.raises(ValueError, match="needs the SDE sampler"):
        OPDSettings(estimator="reference_kl", sampler={"noise_level": 0.0})
    with pytest.raises(ValueError, match="reward_to_go and normalize_advantage must be false"):
        OPDSettings(estimator="reference_kl", credit="step", reward_to_go=True)
    with pytest.raises(ValueError, match="micro_batch 4 may not split the batch"):
        OPDSettings(estimator="reference_kl", micro_batch=4, prompts_per_step=2, group_size=4)
    OPDSettings(estimator="reference_kl", micro_batch=8, prompts_per_step=2, group_size=4)
    OPDSettings(estimator="gkd", micro_batch=4, prompts_per_step=2, group_size=4)  # gkd is per sample


# ---------------------------------------------------------------- the trainer on a micro tiny bundle
def test_reference_kl_update_applies_the_gradient_of_their_update(spec, states, pool):  # noqa: F811
    """The trainer's update (MAR to the quality teacher at 0.04, grad_clip off) leaves the gradient of their loss,
    averaged over the trained steps, with their std_dev_t computed from the rollout's sigmas."""
    teachers = {name: bundle_of(spec, states[name]) for name in ("text", "quality")}
    trainer = make_trainer(spec, states, pool, anchor=teachers["quality"], mar_weight=0.04, teachers=teachers,
                           estimator="reference_kl", credit="step", grad_clip=None)
    rollout = trainer.rollout(0)
    traj, config, batch = rollout.trajectory, Config(), len(rollout.tasks)
    sample = {"log_probs": traj.log_probs.T}  # (B, T), their layout
    losses = []
    for j in range(2):
        sigma, sigma_prev = traj.sigmas[j], traj.sigmas[j + 1]
        std_dev_t = (torch.sqrt(sigma / (1 - torch.where(sigma == 1, traj.sigmas[1].item(), sigma))) * 0.7).expand(
            batch, 1, 1, 1)
        log_prob, prev_sample_mean, _ = step_log_prob(trainer.bundle, traj.latents[j], traj.latents[j + 1],
                                                      sigma.item(), sigma_prev.item(), rollout.cond, cfg=3.0,
                                                      noise_level=0.7, reduction="mean")
        mean_of = {}
        for name, velocity in (*trainer.teachers.items(), ("anchor", trainer.anchor)):
            with torch.no_grad():
                mean_of[name] = step_log_prob(trainer.bundle, traj.latents[j], traj.latents[j + 1], sigma.item(),
                                              sigma_prev.item(), rollout.cond, cfg=3.0, noise_level=0.7,
                                              reduction="mean", velocity_fn=velocity)[1]
        routed = torch.stack([mean_of[trainer.teacher_names[k]][i] for i, k in enumerate(rollout.tasks)])
        losses.append(reference_loss(config, sample, j, log_prob, prev_sample_mean, std_dev_t, routed,
                                     mean_of["anchor"])[0])
    expected = torch.autograd.grad(torch.stack(losses).mean(), trainer.params, allow_unused=True)
    trainer.update(rollout, 0)
    pairs = [(p.grad, g) for p, g in zip(trainer.params, expected) if g is not None]
    assert pairs and sum(g.abs().sum() for _, g in pairs) > 0
    for applied, wanted in pairs:
        torch.testing.assert_close(applied, wanted, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("estimator", ["reference_kl", "gkd"])
def test_inner_epochs_train_and_the_second_epoch_clips(spec, states, pool, estimator):  # noqa: F811
    """Epoch 1's ratio is exactly 1 (rollout and update split alike); after one update the clip at 1e-4 acts."""
    rows = {}
    for epochs in (1, 2):
        trainer = make_trainer(spec, states, pool, estimator=estimator, credit="step", inner_epochs=epochs)
        before = [p.detach().clone() for p in trainer.params]
        rows[epochs] = train(trainer, 2, progress=False)
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    for curve in rows.values():
        for row in curve:
            assert all(math.isfinite(row[k]) for k in ("reward", "kl", "v_mse", "loss", "grad_norm"))
            assert row["kl"] > 0 and row["reward"] < 0  # -D, clamped or not, under the rollout policy
    if estimator == "gkd":
        assert all(row["clip_frac"] is None for curve in rows.values() for row in curve)
    else:
        assert all(row["clip_frac"] == 0.0 for row in rows[1])
        assert all(row["clip_frac"] > 0.0 for row in rows[2])
        assert rows[1][0]["reward"] == pytest.approx(rows[2][0]["reward"], rel=1e-6)  # epoch 0's advantage alike

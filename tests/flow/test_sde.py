"""The SDE step against closed forms, torch.distributions and diffusers' scheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowopd.flow.sde import (
    gaussian_log_prob,
    kl_from_velocities,
    noise_scale,
    sde_step,
    sde_step_mean_std,
    sigma_schedule,
    step_divergence,
    step_kl,
)


def _batch(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (10, 1.0), (10, 3.0), (40, 3.0), (28, 2.5)])
def test_sigma_schedule_matches_diffusers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = sigma_schedule(steps, shift)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32
    assert ours[0] == 1.0 and ours[-1] == 0.0
    assert (ours[1:] < ours[:-1]).all()
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-7)


def test_mean_std_formula_and_flow_grpo_first_step():
    x, v, _ = _batch()
    s, s_next, a = 0.6, 0.45, 0.7
    mean, std = sde_step_mean_std(x, v, s, s_next, a)
    sd = a * math.sqrt(s / (1 - s))
    d = s_next - s
    # Flow-GRPO's written form: x (1 + sd^2/(2s) d) + v (1 + sd^2 (1-s)/(2s)) d
    expected = x * (1 + sd**2 / (2 * s) * d) + v * (1 + sd**2 * (1 - s) / (2 * s)) * d
    torch.testing.assert_close(mean, expected)
    assert std.shape == (3, 1, 1, 1)
    torch.testing.assert_close(std, torch.full_like(std, sd * math.sqrt(-d)))
    # at s = 1 the next sigma replaces s in 1 - s (finite, no NaN)
    mean1, std1 = sde_step_mean_std(x, v, 1.0, 0.9, a)
    assert torch.isfinite(mean1).all()
    torch.testing.assert_close(std1[0, 0, 0, 0], torch.tensor(a * math.sqrt(1 / 0.1) * math.sqrt(0.1)))
    # last step to sigma 0 is well defined
    mean0, std0 = sde_step_mean_std(x, v, 0.1, 0.0, a)
    assert torch.isfinite(mean0).all() and (std0 > 0).all()


def test_noise_level_zero_is_euler():
    x, v, _ = _batch()
    for s, s_next in [(1.0, 0.8), (0.5, 0.3), (0.1, 0.0)]:
        mean, std = sde_step_mean_std(x, v, s, s_next, 0.0)
        torch.testing.assert_close(mean, x + (s_next - s) * v)
        assert (std == 0).all()


def test_per_sample_sigma_matches_scalar_rows():
    x, v, _ = _batch()
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.5, 0.0])
    mean, std = sde_step_mean_std(x, v, sigma, sigma_next, 0.7)
    for i in range(3):
        mean_i, std_i = sde_step_mean_std(
            x[i : i + 1], v[i : i + 1], sigma[i].item(), sigma_next[i].item(), 0.7
        )
        torch.testing.assert_close(mean[i : i + 1], mean_i)
        torch.testing.assert_close(std[i : i + 1], std_i)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    sample, mean, _ = _batch()
    std = torch.tensor([0.3, 1.0, 2.5])  # per sample
    ours = gaussian_log_prob(sample, mean, std, reduction)
    reference = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(sample)
    reference = reference.flatten(1).mean(1) if reduction == "mean" else reference.flatten(1).sum(1)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, reference)
    # a scalar std and the (B,1,1,1) std from sde_step_mean_std give the same as a (B,) one
    torch.testing.assert_close(
        gaussian_log_prob(sample, mean, 0.3, reduction),
        gaussian_log_prob(sample, mean, torch.full((3, 1, 1, 1), 0.3), reduction),
    )


def test_log_prob_refuses_nonpositive_std():
    sample, mean, _ = _batch()
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_log_prob(sample, mean, torch.tensor([0.3, 0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(sample, mean, 1.0, "max")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.93), (0.7, 0.6), (0.2, 0.0), ("batch", "batch")])
def test_step_kl_closed_form_equals_velocity_form(reduction, sigma, sigma_next):
    x, v_a, v_b = _batch(1)
    if sigma == "batch":
        sigma, sigma_next = torch.tensor([1.0, 0.5, 0.1]), torch.tensor([0.8, 0.3, 0.0])
    mean_a, std = sde_step_mean_std(x, v_a, sigma, sigma_next, 0.7)
    mean_b, std_b = sde_step_mean_std(x, v_b, sigma, sigma_next, 0.7)
    torch.testing.assert_close(std, std_b)
    kl = step_kl(mean_a, mean_b, std, reduction)
    assert kl.shape == (3,) and (kl > 0).all()
    torch.testing.assert_close(
        kl, kl_from_velocities(v_a, v_b, sigma, sigma_next, 0.7, reduction), rtol=1e-4, atol=0
    )
    # and it is a true KL: torch.distributions agrees (sum over elements)
    if reduction == "sum":
        scale = std.expand_as(mean_a)
        reference = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean_a, scale), torch.distributions.Normal(mean_b, scale)
        )
        torch.testing.assert_close(kl, reference.flatten(1).sum(1), rtol=1e-4, atol=1e-5)


def test_sde_step_samples_have_the_stated_moments_and_log_prob():
    x = torch.zeros(4000, 1, 2, 2)
    v = torch.ones_like(x)
    g = torch.Generator().manual_seed(0)
    sample, log_prob, mean, std = sde_step(x, v, 0.5, 0.4, 0.7, generator=g)
    assert abs((sample - mean).mean().item()) < 0.01
    assert abs((sample - mean).std().item() / std[0].item() - 1) < 0.02
    torch.testing.assert_close(log_prob, gaussian_log_prob(sample, mean, std))
    # scoring a given sample reproduces the same log-prob and returns it unchanged
    again, log_prob_again, _, _ = sde_step(x, v, 0.5, 0.4, 0.7, prev_sample=sample)
    assert torch.equal(again, sample)
    torch.testing.assert_close(log_prob_again, log_prob)
    # the same seed gives the same draw
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sde_step(x, v, 0.5, 0.4, 0.7, generator=g2)[0], sample)


def test_noise_scale_uses_next_sigma_only_at_one():
    s = torch.tensor([1.0, 0.5])
    s_next = torch.tensor([0.8, 0.4])
    torch.testing.assert_close(noise_scale(s, s_next, 1.0), torch.tensor([math.sqrt(1 / 0.2), 1.0]))


# ---------------------------------------------------------------- CPS (coefficients-preserving sampler)
def test_cps_keeps_every_state_at_its_scheduled_noise_level():
    """With the exact velocity v = n - x0 of a point x_s = (1 - s) x0 + s n, a CPS step lands at
    (1 - s') x0 + s' n' with n' standard normal: its noise coefficient is exactly s' (sqrt(s'^2 - std^2 + std^2))."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(1, 20000, generator=g), torch.randn(1, 20000, generator=g)
    s, s_next, eta = 0.7, 0.4, 0.8
    x = (1 - s) * x0 + s * n
    x_next, _, mean, std = sde_step(x, n - x0, s, s_next, eta, generator=g, sde="cps")
    assert std.item() == pytest.approx(s_next * math.sin(eta * math.pi / 2))
    residual = (x_next - (1 - s_next) * x0) / s_next  # the new noise, standard normal if the level is s'
    assert residual.mean().abs() < 0.03 and residual.std().item() == pytest.approx(1.0, abs=0.02)
    # the mean keeps a share sqrt(1 - sin^2) = cos(eta pi / 2) of the old noise direction
    torch.testing.assert_close(mean, (1 - s_next) * x0 + math.sqrt(s_next**2 - std.item() ** 2) * n)


def test_cps_last_step_is_deterministic_and_flow_is_unchanged():
    x, v, _ = _batch()
    mean, std = sde_step_mean_std(x, v, 0.2, 0.0, 0.7, sde="cps")
    assert float(std.abs().max()) == 0.0
    torch.testing.assert_close(mean, x - 0.2 * v)  # x0^: the sample
    flow = sde_step_mean_std(x, v, 0.6, 0.45, 0.7)
    torch.testing.assert_close(sde_step_mean_std(x, v, 0.6, 0.45, 0.7, sde="flow")[0], flow[0])
    with pytest.raises(ValueError, match="sde must be one of flow, cps"):
        sde_step_mean_std(x, v, 0.6, 0.45, 0.7, sde="ddim")


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (torch.tensor([0.9, 0.5, 0.3]),
                                                                       torch.tensor([0.8, 0.4, 0.1]))])
def test_flow_grpo_divergence_is_its_own_formula(sigma, sigma_next):
    """Flow-GRPO's train_sd3.py: ((mu - mu_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2), std_dev_t = sd(s)."""
    x, v, v_ref = _batch()
    a = 0.7
    mean, std = sde_step_mean_std(x, v, sigma, sigma_next, a)
    mean_ref, _ = sde_step_mean_std(x, v_ref, sigma, sigma_next, a)
    s, s_next = torch.as_tensor(sigma).reshape(-1), torch.as_tensor(sigma_next).reshape(-1)
    std_dev_t = noise_scale(s, s_next, a)
    flow_grpo = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
    ours = step_divergence(mean, mean_ref, std, sigma, sigma_next, "mean", "flow_grpo")
    torch.testing.assert_close(ours, flow_grpo, rtol=1e-5, atol=0)
    exact = step_divergence(mean, mean_ref, std, sigma, sigma_next, "mean", "step")
    torch.testing.assert_close(exact, step_kl(mean, mean_ref, std, "mean"), rtol=0, atol=0)
    per_element = step_divergence(mean, mean_ref, std, sigma, sigma_next, "none", "flow_grpo")
    torch.testing.assert_close(per_element.mean(dim=(1, 2, 3)), flow_grpo, rtol=1e-5, atol=0)


def test_flow_grpo_divergence_is_3_7_to_25_times_weaker_on_the_sd3_grid():
    sigmas = sigma_schedule(10, 3.0)[:-1]  # the trained steps (never the last, to sigma 0)
    x, v, v_ref = _batch()
    ratios = []
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        mean, std = sde_step_mean_std(x, v, s, s_next, 0.7)
        mean_ref, _ = sde_step_mean_std(x, v_ref, s, s_next, 0.7)
        kl = step_divergence(mean, mean_ref, std, s, s_next, form="step")
        ratios.append((kl / step_divergence(mean, mean_ref, std, s, s_next, form="flow_grpo")).mean().item())
    assert 3.5 < min(ratios) < 4.0 and 24 < max(ratios) < 26


def test_divergence_form_is_checked_and_cps_is_unscaled():
    x, v, v_ref = _batch()
    mean, std = sde_step_mean_std(x, v, 0.6, 0.45, 0.5, sde="cps")
    mean_ref, _ = sde_step_mean_std(x, v_ref, 0.6, 0.45, 0.5, sde="cps")
    kl = step_kl(mean, mean_ref, std)
    torch.testing.assert_close(step_divergence(mean, mean_ref, std, 0.6, 0.45, form="flow_grpo", sde="cps"), kl)
    with pytest.raises(ValueError, match="kl_form"):
        step_divergence(mean, mean_ref, std, 0.6, 0.45, form="flowgrpo")

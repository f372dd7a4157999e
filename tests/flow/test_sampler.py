"""Samplers on a toy whose exact velocity is known: Gaussian data x0 ~ N(m, c^2 I).

For x_s = (1 - s) x0 + s e, x_s ~ N((1 - s) m, var_s I) with var_s = (1 - s)^2 c^2 + s^2, and
v(x, s) = E[e - x0 | x_s = x] = (s - (1 - s) c^2) / var_s (x - (1 - s) m) - m.
Both the ODE and Flow-GRPO's SDE must carry N(0, I) to the data distribution.
"""

import pytest
import torch

from flowopd.flow.sampler import Trajectory, sample
from flowopd.flow.sde import gaussian_log_prob, sde_step_mean_std, sigma_schedule
from flowopd.models.bundle import Condition

LATENT = (2, 2, 2)
MEAN = torch.tensor([1.5, -0.5]).view(2, 1, 1).expand(LATENT)
STD = 0.5


class GaussianBundle:
    """The exact velocity field of Gaussian data; CFG mixes in a field whose data mean is shifted by 1."""

    latent_shape = LATENT
    transformer = None

    def __init__(self):
        self.calls = 0

    @staticmethod
    def _field(x, s, mean):
        var = (1 - s) ** 2 * STD**2 + s**2
        return (s - (1 - s) * STD**2) / var * (x - (1 - s) * mean) - mean

    def velocity(self, x, sigma, cond, cfg=1.0, transformer=None):
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        v_cond = self._field(x, s, MEAN)
        if cfg == 1.0:
            return v_cond
        v_uncond = self._field(x, s, MEAN + 1.0)
        return v_uncond + cfg * (v_cond - v_uncond)


def _cond(n):
    return Condition(prompt_embeds=torch.zeros(n, 1, 4), pooled=torch.zeros(n, 4))


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_samples_match_the_data_distribution(noise_level):
    n = 4000
    x = sample(
        GaussianBundle(),
        _cond(n),
        steps=100,
        shift=3.0,
        cfg=1.0,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == (n, *LATENT) and x.dtype == torch.float32
    # Monte Carlo sd per element: 0.5/sqrt(4000) ~ 0.008 (mean), 0.25*sqrt(2/4000) ~ 0.006 (variance)
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(x.var(0), torch.full(LATENT, STD**2), atol=0.03, rtol=0)
    # sanity: an untrained (zero) velocity would leave noise, so the checks above can fail
    assert abs(x.var(0).mean().item() - 1.0) > 0.5


def test_cfg_is_applied():
    x = sample(
        GaussianBundle(),
        _cond(2000),
        steps=50,
        shift=1.0,
        cfg=2.0,
        noise_level=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    # the field is affine in m, so v_u + 2 (v_c - v_u) = 2 v(m) - v(m + 1) = v(m - 1): data mean m - 1
    torch.testing.assert_close(x.mean(0), MEAN - 1.0, atol=0.05, rtol=0)


def test_trajectory_and_log_probs_are_consistent():
    bundle, steps, n = GaussianBundle(), 6, 5
    x, traj = sample(
        bundle,
        _cond(n),
        steps=steps,
        shift=3.0,
        cfg=1.0,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(1),
        return_trajectory=True,
    )
    assert isinstance(traj, Trajectory) and traj.steps == steps and bundle.calls == steps
    assert traj.latents.shape == (steps + 1, n, *LATENT)
    assert traj.next_latents.shape == (steps, n, *LATENT)
    assert traj.log_probs.shape == (steps, n) and torch.isfinite(traj.log_probs).all()
    assert torch.equal(traj.latents[-1], x)
    torch.testing.assert_close(traj.sigmas, sigma_schedule(steps, 3.0))
    # recomputing each step's log-prob from the stored latents gives the sampler's
    for t in range(steps):
        s, s_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
        v = bundle.velocity(traj.latents[t], s, None)
        mean, std = sde_step_mean_std(traj.latents[t], v, s, s_next, 0.7)
        torch.testing.assert_close(gaussian_log_prob(traj.next_latents[t], mean, std), traj.log_probs[t])
        torch.testing.assert_close(traj.means[t], mean)  # the step mean each x' was drawn around


def test_ode_trajectory_is_euler_without_log_probs():
    x_init = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(2))
    x, traj = sample(
        GaussianBundle(),
        _cond(3),
        steps=4,
        shift=1.0,
        cfg=1.0,
        noise_level=0.0,
        generator=None,
        x_init=x_init,
        return_trajectory=True,
    )
    assert traj.log_probs is None and traj.means is None and torch.equal(traj.latents[0], x_init)
    expected, sigmas = x_init, traj.sigmas
    for t in range(4):
        expected = expected + (sigmas[t + 1] - sigmas[t]) * GaussianBundle._field(expected, sigmas[t], MEAN)
    torch.testing.assert_close(x, expected)


def test_seeded_sampling_is_deterministic():
    def run(seed):
        return sample(
            GaussianBundle(),
            _cond(4),
            steps=5,
            shift=3.0,
            cfg=1.5,
            noise_level=0.7,
            generator=torch.Generator().manual_seed(seed),
            return_trajectory=True,
        )

    (x1, t1), (x2, t2), (x3, _) = run(7), run(7), run(8)
    assert torch.equal(x1, x2) and torch.equal(t1.log_probs, t2.log_probs)
    assert not torch.allclose(x1, x3)


# ---------------------------------------------------------------- SDE windows and CPS in the sampler
def test_stochastic_steps_window_and_cps_last_step():
    from flowopd.flow.sampler import stochastic_steps

    assert stochastic_steps(10, 3.0, 0.0).tolist() == [False] * 10
    assert stochastic_steps(10, 3.0, 0.7).tolist() == [True] * 10
    assert stochastic_steps(10, 3.0, 0.7, window=(1, 4)).tolist() == [False, True, True, True] + [False] * 6
    assert stochastic_steps(10, 3.0, 0.7, sde="cps").tolist() == [True] * 9 + [False]
    with pytest.raises(ValueError, match="sde_window"):
        stochastic_steps(10, 3.0, 0.7, window=(3, 11))


def test_sampler_with_a_window_is_the_ode_outside_it():
    """Steps outside the window follow the Euler ODE exactly (log-prob 0); window steps draw noise."""
    import numpy as np

    from flowopd.train.rollouts import trained_steps

    bundle, cond = GaussianBundle(), _cond(3)
    common = {"steps": 6, "shift": 3.0, "cfg": 1.0, "return_trajectory": True}
    _, ode = sample(bundle, cond, noise_level=0.0, generator=torch.Generator().manual_seed(0), **common)
    _, windowed = sample(bundle, cond, noise_level=0.7, generator=torch.Generator().manual_seed(0), window=(2, 4),
                         **common)
    torch.testing.assert_close(windowed.latents[:3], ode.latents[:3])  # identical until the window starts
    assert not torch.allclose(windowed.latents[4], ode.latents[4])
    assert windowed.stochastic.tolist() == [False, False, True, True, False, False]
    assert (windowed.log_probs[[0, 1, 4, 5]] == 0).all() and (windowed.log_probs[[2, 3]] != 0).all()
    rng = np.random.default_rng(0)
    assert trained_steps(6, 1.0, rng, windowed.stochastic) == [2, 3]
    assert trained_steps(6, 0.5, rng, windowed.stochastic) in ([2], [3])


def test_cps_samples_have_the_data_mean_and_no_residual_noise():
    """CPS re-noises a fixed share sin^2(eta pi / 2) of each state's noise, whatever the step size, so it is not an
    SDE discretisation: its samples keep the data mean but not exactly its spread (measured on this toy at 400
    steps: std 0.48 at eta 0.3, 0.40 at eta 0.8, for 0.5). What it guarantees is the schedule's noise level at
    every state and a deterministic last step."""
    common = {"steps": 100, "shift": 3.0, "cfg": 1.0, "noise_level": 0.3}
    x = sample(GaussianBundle(), _cond(4000), generator=torch.Generator().manual_seed(0), sde="cps", **common)
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.05, rtol=0)
    assert x.std(0).mean().item() == pytest.approx(STD, abs=0.05)
    _, trajectory = sample(GaussianBundle(), _cond(8), generator=torch.Generator().manual_seed(0), sde="cps",
                           return_trajectory=True, **common)
    torch.testing.assert_close(trajectory.latents[-1], trajectory.means[-1])  # the last step adds nothing

"""Flow-GRPO's SDE step for rectified-flow models: sigma grid, Gaussian step, log-prob and KL.

Conventions (diffusers SD3): x_s = (1 - s) x0 + s e, v = e - x0, sampling walks s from 1 down to 0.
Flow-GRPO (arXiv 2505.05470) turns the Euler ODE into an SDE with the same marginals:

    sd(s) = a sqrt(s / (1 - s))                                          noise scale, a = noise_level
    mu    = x + d [v + sd^2 / (2 s) (x + (1 - s) v)],   d = s' - s < 0     step mean
    std   = sd sqrt(-d)                                                   step std, x' = mu + std eps

At s = 1 the ratio s / (1 - s) is infinite; like Flow-GRPO's `sde_step_with_logprob` we put the next
sigma in the denominator: sd(1) = a sqrt(1 / (1 - s')), s' = the schedule's second value (its `sigma_max`).
a = 0 gives the Euler step x' = x + d v with std 0. All math runs in fp32 (bf16 overflows in the mean).

`sde="cps"` is the coefficients-preserving sampler (CPS, as Flow-Factory's `FlowCPS` and Flow-GRPO's later
versions), with eta = noise_level in (0, 1]:

    std = s' sin(eta pi / 2),   x0^ = x - s v,   x1^ = x + (1 - s) v
    mu  = (1 - s') x0^ + sqrt(s'^2 - std^2) x1^

so x' = mu + std eps has exactly the noise level s' of the schedule (its noise coefficient is
sqrt(s'^2 - std^2 + std^2) = s'), and the last step (s' = 0) is deterministic: no residual noise in the sample,
which the Flow-GRPO SDE leaves at std ~0.2 in pixel space after its second-to-last step (10 steps, shift 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowopd.spec.choices import KL_FORMS, SDE_KINDS


def sigma_schedule(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """steps + 1 sigmas from 1 to 0, as FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps).

    diffusers spaces timesteps linearly from 1000 down to 1000 * shift(1/1000) (the last training sigma,
    already shifted) and shifts again: sigmas = shift(linspace(1, shift(1/N), steps)),
    with shift(s) = k s / (1 + (k - 1) s), k = shift, N = num_train_timesteps.
    """
    train_last = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)  # float32, as diffusers
    sigma_min = (shift * train_last / (1 + (shift - 1) * train_last)).item()
    sigmas = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([sigmas.float(), torch.zeros(1)])


def _per_sample(value, like: Tensor) -> Tensor:
    """A float or (B,) tensor as fp32 with shape (B or 1, 1, ..., 1), broadcastable against `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value.reshape([1] * like.ndim)


def noise_scale(sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """sd(s) = a sqrt(s / (1 - s)), with 1 - s' in the denominator at s = 1 (Flow-GRPO)."""
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))


def sde_step_mean_std(
    x: Tensor, velocity: Tensor, sigma, sigma_next, noise_level: float, sde: str = "flow"
) -> tuple[Tensor, Tensor]:
    """Mean and std of p(x' | x) for one step s -> s'; sigma, sigma_next are floats or (B,) tensors.

    Returns mean (shape of x, fp32) and std of shape (B, 1, ..., 1), broadcastable against x.
    sde: "flow" (Flow-GRPO's SDE) or "cps" (coefficients-preserving; see the module docstring).
    """
    x, velocity = x.float(), velocity.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    if sde == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0, x1 = x - s * velocity, x + (1 - s) * velocity
        mean = (1 - s_next) * x0 + torch.sqrt((s_next**2 - std**2).clamp(min=0)) * x1
        return mean, std.expand(x.shape[0], *std.shape[1:])
    if sde != "flow":
        raise ValueError(f"sde must be one of {', '.join(SDE_KINDS)}, got {sde!r}")
    d = s_next - s
    sd = noise_scale(s, s_next, noise_level)
    mean = x + d * (velocity + sd**2 / (2 * s) * (x + (1 - s) * velocity))
    std = sd * torch.sqrt(-d)
    return mean, std.expand(x.shape[0], *std.shape[1:])


def reduce_elements(elementwise: Tensor, reduction: str) -> Tensor:
    """(B, ...) -> (B,) by "mean" or "sum" over each sample's elements; "none" keeps them."""
    dims = tuple(range(1, elementwise.ndim))
    if reduction == "mean":
        return elementwise.mean(dim=dims)
    if reduction == "sum":
        return elementwise.sum(dim=dims)
    if reduction == "none":
        return elementwise
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def gaussian_log_prob(sample: Tensor, mean: Tensor, std, reduction: str = "mean") -> Tensor:
    """log N(sample; mean, std^2 I) per sample, averaged ("mean", Flow-GRPO) or summed over elements: (B,); "none":
    per element (B, ...). In fp32, or fp64 when the mean is (checks against transcribed reference code)."""
    dtype = torch.promote_types(mean.dtype, torch.float32)
    sample, mean = sample.to(dtype), mean.to(dtype)
    std = torch.as_tensor(std, device=sample.device).to(dtype)
    if std.ndim == 1:
        std = _per_sample(std, sample).to(dtype)
    if bool((std <= 0).any()):
        raise ValueError(
            "gaussian_log_prob needs std > 0 (noise_level 0 and the ODE sampler have no density)"
        )
    log_prob = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return reduce_elements(log_prob, reduction)


def step_kl(mean_a: Tensor, mean_b: Tensor, std, reduction: str = "mean") -> Tensor:
    """KL(N(mu_a, std^2 I) || N(mu_b, std^2 I)) = ||mu_a - mu_b||^2 / (2 std^2), reduced over elements"""
    mean_a, mean_b = mean_a.float(), mean_b.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_a.device)
    if std.ndim == 1:
        std = _per_sample(std, mean_a)
    return reduce_elements((mean_a - mean_b) ** 2 / (2 * std**2), reduction)


def divergence_scale(sigma, sigma_next, form: str = "step", sde: str = "flow"):
    """What turns the exact step KL into the spec's `kl_form` (a float, or (B,) for per-sample sigmas):

    step:      1, the exact step KL ||mu_a - mu_b||^2 / (2 std^2);
    flow_grpo: s - s', giving Flow-GRPO's D = ||mu_a - mu_b||^2 / (2 sd(s)^2) (train_sd3.py), since on the flow SDE
               std^2 = sd^2 (s - s'): 3.7-25x weaker than the KL on a 10-step shift-3 grid at the same beta.
               Flow-GRPO's CPS step divides by its std itself, so there D = KL.
    """
    if form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {', '.join(KL_FORMS)}, got {form!r}")
    if form == "step" or sde == "cps":
        return 1.0
    return torch.as_tensor(sigma, dtype=torch.float32) - torch.as_tensor(sigma_next, dtype=torch.float32)


def step_divergence(mean_a: Tensor, mean_b: Tensor, std, sigma, sigma_next, reduction: str = "mean",
                    form: str = "step", sde: str = "flow") -> Tensor:
    """The KL term between two steps of one std in the spec's `kl_form` (divergence_scale)."""
    kl = step_kl(mean_a, mean_b, std, reduction)
    scale = divergence_scale(sigma, sigma_next, form, sde)
    if isinstance(scale, float):
        return kl if scale == 1.0 else kl * scale
    scale = scale.to(kl.device)
    return kl * (_per_sample(scale, kl) if kl.ndim > 1 and scale.ndim else scale)


def kl_from_velocities(
    v_a: Tensor, v_b: Tensor, sigma, sigma_next, noise_level: float, reduction: str = "mean"
) -> Tensor:
    """The same KL from the two velocities (docs/method.md#the-sde-step-and-its-log-probability), for reference and checks:

    KL = (-d / 2) (1 / sd + sd (1 - s) / (2 s))^2 ||v_a - v_b||^2.
    """
    if noise_level <= 0:
        raise ValueError("kl_from_velocities needs noise_level > 0")
    v_a, v_b = v_a.float(), v_b.float()
    s, s_next = _per_sample(sigma, v_a), _per_sample(sigma_next, v_a)
    sd = noise_scale(s, s_next, noise_level)
    coefficient = (-(s_next - s) / 2) * (1 / sd + sd * (1 - s) / (2 * s)) ** 2
    return reduce_elements(coefficient * (v_a - v_b) ** 2, reduction)


def sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
    reduction: str = "mean",
    noise: Tensor | None = None,
    sde: str = "flow",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One SDE step: draw x' = mu + std eps (or score the given prev_sample). -> (x', log p(x' | x), mu, std)

    The noise is drawn on the generator's device and moved to x's, so a seeded CPU generator gives the same
    samples on every device; `noise` passes eps drawn by the caller instead.
    """
    mean, std = sde_step_mean_std(x, velocity, sigma, sigma_next, noise_level, sde)
    if prev_sample is None:
        if noise is None:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = mean + std * noise.to(mean.device)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduction)
    return prev_sample.float(), log_prob, mean, std

"""Sampling a bundle along the sigma grid: Flow-GRPO's SDE (rollouts with log-probs) or the Euler ODE (eval).

Every step, including the last one to sigma 0, is a Gaussian SDE step when noise_level > 0, as in Flow-GRPO's
`run_sampling` (its std there is sd(s) sqrt(s) > 0, so the last step is well defined; trainers skip it).
noise_level = 0 is the deterministic Euler sampler x' = x + (s' - s) v: no density, so log_probs is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowopd.flow.sde import sde_step, sde_step_mean_std, sigma_schedule
from flowopd.models.bundle import Bundle, Condition, micro_batched_velocity


@dataclass
class Trajectory:
    """One batch of rollouts: x_{s_0} ... x_{s_T}, log p(x_{s_{t+1}} | x_{s_t}) and the steps' means."""

    latents: Tensor  # (T+1, B, C, H, W), fp32; latents[0] is the initial noise, latents[-1] the sample
    log_probs: Tensor | None  # (T, B) under the sampling policy; None for the ODE sampler
    sigmas: Tensor  # (T+1,), sigmas[t] is the noise level of latents[t]
    means: Tensor | None = None  # (T, B, C, H, W): mean of the Gaussian step t (OPD's per-element rewards use it)
    stochastic: Tensor | None = None  # (T,) bool: steps that drew noise (the others are Euler, log-prob 0)

    @property
    def next_latents(self) -> Tensor:
        """(T, B, C, H, W): the result x' of step t, next to latents[:-1], its input x."""
        return self.latents[1:]

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1


@torch.no_grad()
def sample(
    bundle: Bundle,
    cond: Condition,
    *,
    steps: int,
    shift: float,
    cfg: float,
    noise_level: float,
    generator: torch.Generator | None,
    x_init: Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    transformer=None,
    log_prob_reduction: str = "mean",
    share: tuple[int, int] = (0, 1),
    sde: str = "flow",
    window: tuple[int, int] | None = None,
    micro_batch: int | None = None,
):
    """Draw one sample per condition row. -> x (B, C, H, W) fp32, or (x, Trajectory) with return_trajectory.

    The noise is drawn on the generator's device, so a seeded CPU generator is reproducible anywhere.
    share (index, count): these B rows are share `index` of a batch of count x B split over processes; every
    draw is made for the whole batch and this share's rows kept, so the split batch samples like the whole one.
    `transformer` overrides the bundle's (e.g. an EMA copy); runs without grad (trainers recompute log-probs).
    sde: the stochastic step's form ("flow": Flow-GRPO, "cps": coefficients-preserving; flowopd.flow.sde).
    window (start, end): only steps start <= t < end are stochastic (Flow-GRPO-Fast's SDE window), the others
    Euler; None: every step when noise_level > 0. A step whose std is 0 (CPS's last one) is deterministic too.
    Trajectory.stochastic marks the steps with a density; the others carry log-prob 0 and their Euler result.
    micro_batch: rows per transformer forward (x2 with CFG; None: all B); the noise is still drawn for the whole
    batch, so only float summation order depends on it, and a trainer recomputing the velocities in the same
    micro-batches (flowopd.models.bundle.micro_batches) gets the rollout's log-probs exactly.
    """
    device = cond.prompt_embeds.device
    gen_device = generator.device if generator is not None else device
    index, count = share
    rows = slice(index * len(cond), (index + 1) * len(cond))

    def draw_noise() -> Tensor:
        whole = (count * len(cond), *bundle.latent_shape)
        return torch.randn(whole, generator=generator, device=gen_device, dtype=torch.float32)[rows]

    x = (draw_noise() if x_init is None else x_init).to(device=device, dtype=torch.float32)
    sigmas = sigma_schedule(steps, shift)
    stochastic = stochastic_steps(steps, shift, noise_level, sde, window)
    latents, log_probs, means = [x], [], []
    for t in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        sigma, sigma_next = sigmas[t].item(), sigmas[t + 1].item()
        velocity = micro_batched_velocity(bundle, x, sigma, cond, cfg, transformer, micro_batch)
        if not stochastic[t]:
            x, _ = sde_step_mean_std(x, velocity, sigma, sigma_next, 0.0)  # Euler: x + (s' - s) v
            if noise_level > 0:  # keep the trajectory's per-step arrays aligned with the steps
                log_probs.append(torch.zeros(len(x), device=x.device))
                means.append(x)
        else:
            x, log_prob, mean, _ = sde_step(
                x, velocity, sigma, sigma_next, noise_level, reduction=log_prob_reduction, noise=draw_noise(),
                sde=sde,
            )
            log_probs.append(log_prob)
            means.append(mean)
        latents.append(x)
    if not return_trajectory:
        return x
    trajectory = Trajectory(
        latents=torch.stack(latents), log_probs=torch.stack(log_probs) if log_probs else None, sigmas=sigmas,
        means=torch.stack(means) if means else None, stochastic=stochastic,
    )
    return x, trajectory


def stochastic_steps(steps: int, shift: float, noise_level: float, sde: str = "flow",
                     window: tuple[int, int] | None = None) -> Tensor:
    """(steps,) bool: which steps of the sampler draw noise (and so have a log-density)."""
    if noise_level == 0:
        return torch.zeros(steps, dtype=torch.bool)
    mask = torch.ones(steps, dtype=torch.bool)
    if window is not None:
        start, end = window
        if not 0 <= start < end <= steps:
            raise ValueError(f"sde_window {list(window)} must satisfy 0 <= start < end <= steps ({steps})")
        mask[:] = False
        mask[start:end] = True
    if sde == "cps":
        mask &= sigma_schedule(steps, shift)[1:] > 0  # the last step of CPS has std 0
    return mask

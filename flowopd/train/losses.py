"""Losses the trainers share: PPO-clip on per-step log-probs (GRPO, OPD's PPO estimators) and plain flow matching
(the SFT cold start). Each method's own objective lives beside its trainer (flowopd.methods)."""

from __future__ import annotations

import torch
from torch import Tensor

from flowopd.models.bundle import Condition


# ---------------------------------------------------------------- PPO-clip
def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_eps: float):
    """Per-sample max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log_prob - old_log_prob). -> (loss, ratio)

    At r = 1 its gradient is -A grad log_prob; outside 1 +- eps, in the direction that would increase A r further,
    the clipped branch wins and the gradient is zero.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), ratio


# ---------------------------------------------------------------- SFT on teacher samples
def flow_matching_draws(x0: Tensor, generator: torch.Generator,
                        time_sampling: str = "logit_normal") -> tuple[Tensor, Tensor]:
    """(noise e, times s) of a whole batch: e ~ N(0, I) like x0, s ~ logit-normal(0, 1) or uniform, one per row."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    if time_sampling == "logit_normal":
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    elif time_sampling == "uniform":
        sigma = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {time_sampling!r}")
    return noise, sigma.to(x0.device)


def flow_matching_loss(bundle, x0: Tensor, cond: Condition, noise: Tensor, sigma: Tensor,
                       rows: slice | None = None) -> Tensor:
    """|| v_theta(x_s, s, c) - (e - x0) ||^2 averaged, x_s = (1 - s) x0 + s e (the base's pretraining loss,
    flowopd.methods.pretrain), with the batch's draws (flow_matching_draws). `rows`: a share of the batch (a
    process's, a micro-batch of it): the share's part of the whole batch's mean, so the shares' gradients add up."""
    batch = x0.shape[0]
    if rows is not None:
        x0, noise, sigma, cond = x0[rows], noise[rows], sigma[rows], cond.index(rows)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    velocity = bundle.velocity((1 - s) * x0 + s * noise, sigma, cond)
    loss = torch.nn.functional.mse_loss(velocity.float(), (noise - x0).float())
    return loss if rows is None else loss * (x0.shape[0] / batch)

"""The OPD objectives as small pure functions: per-step rewards, advantages, divergences and each estimator's loss
(docs/method.md#on-policy-distillation; the trainer is flowopd.methods.opd_trainer).

Step means mu = x + d [v + sd^2 / (2 s) (x + (1 - s) v)], d = s' - s, std = sd sqrt(-d) (flowopd.flow.sde); on the ODE
sd = 0 and mu = x + d v. Per trained step t, reduced over elements by the sampler's log-prob reduction:
  sampled        r_t = log N(x_{t+1}; mu_T, std^2) - log p_old(x_{t+1} | x_t)   L_t = PPO-clip(A_t)   E[r_t] = -KL
  analytic       r_t = -KL(N(mu_old, std^2) || N(mu_T, std^2)), constant in x_{t+1}  L_t = PPO-clip(A_t)
  analytic_grad  L_t = KL(N(mu_S, std^2) || N(mu_T, std^2)) = ||mu_S - mu_T||^2 / (2 std^2), differentiated
  diffusion_opd  L_t = ||mu_S - mu_T||^2 / (2 w_t), w_t = 1 on the ODE, sd(s)^2 on the SDE
                 (DiffusionOPD, arXiv 2605.15055: its training script's per-step KL)
  velocity_mse   L = ||v_S(x_q) - v_T(x_q)||^2 at ONE state x_q per rollout (DanceOPD, arXiv 2606.27377)
  reference_kl   A_t = clamp(kl_scale D_t, +-adv_clip), D_t = mean_d (mu_S - mu_T)^2 / (2 sd(s)^2) WITH the student's
                 gradient, L_t = mean_{i,j} max(-A_i r_j, -A_i clip(r_j)) over the batch's pairs (Flow-OPD's code)
  gkd            L_t = D_t, differentiated (Flow-OPD's code, reward_mode gkd)
A_t = r_t, or the reward-to-go sum_{t' >= t} r_t', optionally standardised per step; credit "element" keeps each
latent element's own log-ratio as the advantage of that element's log-prob. MAR adds lambda times the estimator's own
divergence to the anchor's step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flowopd.flow.sde import gaussian_log_prob, noise_scale, reduce_elements, step_kl
from flowopd.spec.choices import CREDITS, ESTIMATORS, PPO_ESTIMATORS, REFERENCE_ESTIMATORS
from flowopd.train.losses import ppo_clip_loss
from flowopd.train.rollouts import ADV_EPS

QUERY_BETA = (5.0, 2.0)  # DanceOPD's default draw of its query state, biased to the low-noise end


# ---------------------------------------------------------------- the math, as small pure functions
def nats_per_unit(x: Tensor, reduction: str) -> int:
    """Elements per sample under "mean" (a reduced log-prob is 1/D of the log-density), 1 under "sum"."""
    return x[0].numel() if reduction == "mean" else 1


@torch.no_grad()
def step_rewards(estimator: str, x_next: Tensor, mean_student: Tensor, mean_teacher: Tensor, std,
                 old_log_prob: Tensor | None = None, reduction: str = "mean", credit: str = "step") -> Tensor:
    """Per-sample reward (B,) of one step, detached, in nats (of the whole step's density); credit "element": per
    element (B, ...), in nats of that element, from the student's step mean (old_log_prob is not used).

    sampled:  r = log N(x'; mu_T, std^2) - log p_old(x' | x); old_log_prob is the rollout's (reduced by
              `reduction`), or log N(x'; mean_student, std^2) when None.
    analytic: r = -KL(N(mean_student, std^2) || N(mu_T, std^2)) = -||mean_student - mu_T||^2 / (2 std^2).
    Why nats: the PPO ratio uses log-probs reduced by `reduction` (mean: log-density / D), so the policy gradient
    E[r grad log p_mean] = -grad KL / D = -grad KL_mean is the gradient of the analytic_grad loss and on the same
    scale as the MAR term (both KL_mean); rewards in mean units would shrink it D times more.
    """
    if credit == "element":
        if estimator == "sampled":
            return (gaussian_log_prob(x_next, mean_teacher, std, "none")
                    - gaussian_log_prob(x_next, mean_student, std, "none"))
        if estimator == "analytic":
            return -step_kl(mean_student, mean_teacher, std, "none")
    elif credit != "step":
        raise ValueError(f"credit must be one of {', '.join(CREDITS)}, got {credit!r}")
    units = nats_per_unit(x_next, reduction)
    if estimator == "sampled":
        if old_log_prob is None:
            old_log_prob = gaussian_log_prob(x_next, mean_student, std, reduction)
        return units * (gaussian_log_prob(x_next, mean_teacher, std, reduction) - old_log_prob)
    if estimator == "analytic":
        return -units * step_kl(mean_student, mean_teacher, std, reduction)
    if estimator in ESTIMATORS:
        raise ValueError(f"{estimator} has no per-step reward: its divergence is differentiated in the loss")
    raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")


def step_advantages(rewards: Tensor, reward_to_go: bool = False, normalize: bool = False,
                    eps: float = ADV_EPS) -> Tensor:
    """rewards (T, B) of the trained steps in order -> advantages (T, B); (T, B, ...) per element likewise.

    reward_to_go: A_t = sum_{t' >= t} r_t'; normalize: A_t = (A_t - mean_b A_t) / (std_b A_t + eps) per step, the
    population std over the batch (and the elements).
    """
    advantages = rewards.flip(0).cumsum(0).flip(0) if reward_to_go else rewards
    if normalize:
        dims = tuple(range(1, rewards.ndim))
        advantages = (advantages - advantages.mean(dims, keepdim=True)) / (advantages.std(dims, keepdim=True,
                                                                                          correction=0) + eps)
    return advantages


def diffusion_opd_variance(sigma, sigma_next, noise_level: float):
    """w_t of DiffusionOPD's per-step loss ||mu_S - mu_T||^2 / (2 w_t): 1 on the ODE (its configs' rollouts), and on
    the SDE its training script's std_dev_t^2 = sd(s)^2 = a^2 s / (1 - s), Flow-GRPO's std before the sqrt(-d)
    factor: the exact step KL (w = std^2 = sd^2 (-d)) times (s - s')."""
    if noise_level == 0:
        return 1.0
    s, s_next = torch.as_tensor(sigma, dtype=torch.float32), torch.as_tensor(sigma_next, dtype=torch.float32)
    return noise_scale(s, s_next, noise_level) ** 2


# ---------------------------------------------------------------- the Flow-OPD reference code's update
# CostaliyA/Flow-OPD, scripts/train_sd3_opd_mix.py (training loop, `reward_mode`); Flow-GRPO's step
# (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py) returns prev_sample_mean = our step mean mu and
# std_dev_t = sd(s) = a sqrt(s / (1 - s)), the std BEFORE its sqrt(-dt) factor: our step std is sd(s) sqrt(s - s'),
# and sd(s)^2 is `diffusion_opd_variance`. Its log_prob is our "mean"-reduced gaussian_log_prob.
def reference_divergence(mean: Tensor, target: Tensor, variance) -> Tensor:
    """D = mean_d (mu - mu_target)^2 / (2 std_dev_t^2) per sample (B,), variance = std_dev_t^2 = sd(s)^2: the
    reference code's `kl_reward` (and its MAR `kl_loss` with the anchor as target), the step KL (summed over the n
    elements) times (s - s') / n. In the mean's dtype (fp64 in the checks against the transcribed code)."""
    variance = torch.as_tensor(variance, device=mean.device).to(mean.dtype)
    if variance.ndim == 1:  # one per sample
        variance = variance.reshape(-1, *[1] * (mean.ndim - 1))
    dims = tuple(range(1, mean.ndim))
    # ((prev_sample_mean - prev_sample_mean_ref_lora) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t ** 2)
    return (((mean - target) ** 2).mean(dim=dims, keepdim=True) / (2 * variance)).reshape(len(mean))


def reference_kl_loss(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, mean_teacher: Tensor, variance,
                      kl_scale: float, adv_clip: float, clip_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The reference code's `reward_mode: kl_only`, `kl_reward_level: step_wise` update of one step -> (per-sample
    loss (B,), ratio (B,), advantages (B,)).

    A_i = clamp(kl_scale D_i, -adv_clip, adv_clip), D from the student's mean WITH its gradient (not detached there),
    so the loss is differentiated through A as well as through the ratio r_j = exp(log p_j - log p_old_j). Its
    advantages have shape (B, 1) (`kl_reward.squeeze(-1).squeeze(-1)` of a (B, 1, 1, 1)) against a (B,) ratio: the
    PPO-clip terms broadcast to (B, B), every sample's advantage against every sample's ratio, and `torch.mean`
    averages all B^2 pairs. Row i here is sample i's advantage against all ratios, so the mean of the returned loss
    is that mean. Its expected gradient over x' is the per-sample PPO-clip's (A_i does not depend on x'); sample
    for sample the score-function part differs.
    """
    advantages = torch.clamp(kl_scale * reference_divergence(mean, mean_teacher, variance), -adv_clip, adv_clip)
    pairs, ratio = ppo_clip_loss(log_prob, old_log_prob, advantages[:, None], clip_eps)  # (B, B): A_i against r_j
    return pairs.mean(dim=1), ratio, advantages


def mean_gap(mean_a: Tensor, mean_b: Tensor, variance, reduction: str = "mean") -> Tensor:
    """||mu_a - mu_b||^2 / (2 variance), reduced over elements: the step KL when variance = std^2."""
    variance = torch.as_tensor(variance, dtype=torch.float32, device=mean_a.device)
    if variance.ndim == 1:  # one per sample
        variance = variance.reshape(-1, *[1] * (mean_a.ndim - 1))
    return reduce_elements((mean_a.float() - mean_b.float()) ** 2 / (2 * variance), reduction)


def velocity_mse(v_a: Tensor, v_b: Tensor, reduction: str = "mean") -> Tensor:
    """||v_a - v_b||^2 reduced over elements ("mean": DanceOPD's F.mse_loss per sample)."""
    return reduce_elements((v_a.float() - v_b.float()) ** 2, reduction)


def velocity_gap(mean_a: Tensor, mean_b: Tensor, sigma, sigma_next, noise_level: float) -> Tensor:
    """v_a - v_b from two step means at the same x: mu_a - mu_b = d (1 + sd^2 (1 - s) / (2 s)) (v_a - v_b)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=mean_a.device)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=mean_a.device)
    if s.ndim == 1:
        s, s_next = (v.reshape(-1, *[1] * (mean_a.ndim - 1)) for v in (s, s_next))
    sd = noise_scale(s, s_next, noise_level)
    return (mean_a.float() - mean_b.float()) / ((s_next - s) * (1 + sd**2 * (1 - s) / (2 * s)))


def velocity_weight(estimator: str, sigma: float, sigma_next: float, noise_level: float) -> float:
    """c_t in L_t = c_t mean_d (v_S - v_T)^2: how an estimator weighs the velocity error at step t (the PPO ones:
    the weight of their expected gradient, E[grad L_t] = grad KL_t). With d = s' - s and
    c = 1 + sd^2 (1 - s) / (2 s), mu_S - mu_T = d c (v_S - v_T), so
        KL (analytic_grad, sampled, analytic)   (-d / 2) (c / sd)^2
        diffusion_opd                           d^2 / 2 on the ODE, d^2 c^2 / (2 sd^2) = (-d) KL's on the SDE
        gkd, reference_kl                       d^2 c^2 / (2 sd^2), D's (reference_kl: unclamped, at r = 1)
        velocity_mse                            1 at its queried step (0 at the others)
    """
    if estimator == "velocity_mse":
        return 1.0
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if noise_level <= 0 and estimator != "diffusion_opd":
        raise ValueError(f"{estimator}'s divergence needs noise_level > 0")
    d = sigma_next - sigma
    sd = noise_level * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
    c = 1 + (sd**2 * (1 - sigma) / (2 * sigma) if noise_level > 0 else 0.0)
    if estimator in ("diffusion_opd", *REFERENCE_ESTIMATORS):
        return d**2 / 2 if noise_level == 0 else d**2 * c**2 / (2 * sd**2)
    return -d / 2 * (c / sd) ** 2


def step_loss(estimator: str, log_prob: Tensor | None, old_log_prob: Tensor | None, mean: Tensor,
              mean_teacher: Tensor, std, advantages: Tensor | None, clip_eps: float, reduction: str = "mean",
              mean_anchor: Tensor | None = None, mar_weight: float = 0.0, variance=None, kl_scale: float = -1.0,
              adv_clip: float = 5.0) -> tuple[Tensor, dict]:
    """Per-sample loss (B,) of one trained step and its terms {"policy", "ratio", "mar_kl", "advantages"} (None
    when absent).

    sampled / analytic: PPO-clip with the advantages; analytic_grad: KL(N(mean, std^2) || N(mu_T, std^2));
    diffusion_opd: ||mean - mu_T||^2 / (2 variance) (`diffusion_opd_variance`); reference_kl: `reference_kl_loss`
    (its advantages come from the mean, `advantages` is not used); gkd: `reference_divergence`; plus mar_weight
    times the same divergence to the anchor's mean when one is given and the weight > 0. Per-element advantages
    (credit "element") take per-element log-probs (B, ...): each element's PPO-clip term, reduced by `reduction`.
    """
    if estimator in ("diffusion_opd", *REFERENCE_ESTIMATORS):
        if variance is None:
            raise ValueError(f"{estimator}'s loss needs the variance (diffusion_opd_variance)")

        def divergence(target):
            if estimator == "diffusion_opd":
                return mean_gap(mean, target, variance, reduction)
            return reference_divergence(mean, target, variance)
    else:
        def divergence(target):
            return step_kl(mean, target, std, reduction)
    ratio = None
    if estimator in ("analytic_grad", "diffusion_opd", "gkd"):
        policy = divergence(mean_teacher)
    elif estimator == "reference_kl":
        policy, ratio, advantages = reference_kl_loss(log_prob, old_log_prob, mean, mean_teacher, variance, kl_scale,
                                                      adv_clip, clip_eps)
    elif estimator in PPO_ESTIMATORS:
        policy, ratio = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_eps)
        policy = reduce_elements(policy, reduction) if policy.ndim > 1 else policy
    else:
        dense = [e for e in ESTIMATORS if e != "velocity_mse"]
        raise ValueError(f"estimator {estimator!r} has no per-step loss (one of {', '.join(dense)})")
    loss, mar_kl = policy, None
    if mean_anchor is not None and mar_weight > 0:
        mar_kl = divergence(mean_anchor)
        loss = loss + mar_weight * mar_kl
    return loss, {"policy": policy, "ratio": ratio, "mar_kl": mar_kl,
                  "advantages": advantages if estimator == "reference_kl" else None}


def query_steps(rng: np.random.Generator, n: int, sampler_steps: int, query=None) -> np.ndarray:
    """velocity_mse: the sampler step (0 = pure noise) whose state each of n rollouts is queried at.

    query.steps [lo, hi] (inclusive; None: the low-noise half [T // 2, T - 1]); query.draw "uniform" over it, or
    "beta": lo + floor(u (hi - lo + 1)), u ~ Beta(5, 2), DanceOPD's draw biased to the low-noise end.
    """
    lo, hi = query.steps if query is not None and query.steps is not None else (sampler_steps // 2, sampler_steps - 1)
    if not 0 <= lo <= hi < sampler_steps:
        raise ValueError(f"query steps [{lo}, {hi}] are not within the sampler's steps 0 .. {sampler_steps - 1}")
    if query is None or query.draw == "uniform":
        return rng.integers(lo, hi + 1, size=n)
    u = rng.beta(*QUERY_BETA, size=n)
    return np.minimum(lo + np.floor(u * (hi - lo + 1)).astype(int), hi)

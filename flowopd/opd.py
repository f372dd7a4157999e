"""Stage 3: multi-teacher on-policy distillation with Manifold Anchor Regularisation (method.md section 4).

One OPD step k:
1. rollouts: the student samples P prompts x G (flowopd.rollout, GRPO's seeded streams): the SDE, storing
   x_{s_0} ... x_{s_T}, log p_old(x_{t+1} | x_t) and the step means, or (noise_level 0) the Euler ODE; each sample's
   prompt was routed to ONE teacher beforehand;
2. targets, under no_grad, one forward per teacher over the rows routed to it: the teacher's velocity v_T at the
   student's own x_t, same s, same condition, same CFG, and its step mean mu_T (the anchor's v_A, mu_A with MAR);
3. the estimator (`opd.estimator`) turns them into a loss. Step means mu = x + d [v + sd^2 / (2 s) (x + (1 - s) v)],
   d = s' - s, std = sd sqrt(-d) (flowopd.sde); on the ODE sd = 0 and mu = x + d v. Dense estimators train the
   trained steps t (a share of all but the last); per-step rewards are in nats of the whole step (`step_rewards`):
     sampled        r_t = log N(x_{t+1}; mu_T, std^2) - log p_old(x_{t+1} | x_t)   L_t = PPO-clip(A_t)   E[r_t] = -KL
     analytic       r_t = -KL(N(mu_old, std^2) || N(mu_T, std^2)), constant in x_{t+1}  L_t = PPO-clip(A_t)
     analytic_grad  L_t = KL(N(mu_S, std^2) || N(mu_T, std^2)) = ||mu_S - mu_T||^2 / (2 std^2), differentiated
     diffusion_opd  L_t = ||mu_S - mu_T||^2 / (2 w_t), w_t = 1 on the ODE, sd(s)^2 on the SDE
                    (DiffusionOPD, arXiv 2605.15055: its training script's per-step KL; see README)
     velocity_mse   L = ||v_S(x_q) - v_T(x_q)||^2 at ONE state x_q per rollout, q drawn from `opd.query`'s range
                    of low-noise steps (DanceOPD, arXiv 2606.27377)
   (reduced over elements by the sampler's log-prob reduction). A_t = r_t, or the reward-to-go sum_{t' >= t} r_t',
   optionally standardised per step; credit "element" keeps each latent element's own log-ratio r_{t,d} as the
   advantage of that element's log-prob (per-token OPD with the elements as tokens);
4. MAR: L_t += lambda D(student step || anchor step), D the estimator's own divergence (the KL; diffusion_opd's
   mean gap; velocity_mse's velocity MSE), lambda = mar.weight; one clipped AdamW update per inner epoch;
5. every `ema.every` steps the EMA of the weights moves (flowopd.trainer); the EMA is what the phase saves.
Samples routed to "base" are taught by the base model.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowopd.artifacts import now
from flowopd.distributed import Processes, relaunch_if_asked
from flowopd.grpo import ppo_clip_loss
from flowopd.models.loading import weights_sha
from flowopd.phases import opd_sub_spec  # the sub-spec the stage is keyed on (flowopd.pipeline)
from flowopd.rollout import ADV_EPS, draw_rollout, trained_steps
from flowopd.sde import gaussian_log_prob, noise_scale, reduce_elements, sde_step_mean_std, step_kl
from flowopd.trainer import Trainer, lora_settings, run_training
from flowopd.training import ADAPTER, TIMESTEP_STREAM, step_log_prob, step_rng

ESTIMATORS = ("sampled", "analytic", "analytic_grad", "diffusion_opd", "velocity_mse")
PPO_ESTIMATORS = ("sampled", "analytic")  # a per-step reward as the advantage of PPO-clip
SDE_ESTIMATORS = ("sampled", "analytic", "analytic_grad")  # need the SDE's Gaussian steps (noise_level > 0)
CREDITS = ("step", "element")
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
        velocity_mse                            1 at its queried step (0 at the others)
    """
    if estimator == "velocity_mse":
        return 1.0
    d = sigma_next - sigma
    sd = noise_level * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
    c = 1 + (sd**2 * (1 - sigma) / (2 * sigma) if noise_level > 0 else 0.0)
    if estimator == "diffusion_opd":
        return d**2 / 2 if noise_level == 0 else d**2 * c**2 / (2 * sd**2)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if noise_level <= 0:
        raise ValueError(f"{estimator}'s KL needs noise_level > 0")
    return -d / 2 * (c / sd) ** 2


def step_loss(estimator: str, log_prob: Tensor | None, old_log_prob: Tensor | None, mean: Tensor,
              mean_teacher: Tensor, std, advantages: Tensor | None, clip_eps: float, reduction: str = "mean",
              mean_anchor: Tensor | None = None, mar_weight: float = 0.0, variance=None) -> tuple[Tensor, dict]:
    """Per-sample loss (B,) of one trained step and its terms {"policy", "ratio", "mar_kl"} (None when absent).

    sampled / analytic: PPO-clip with the advantages; analytic_grad: KL(N(mean, std^2) || N(mu_T, std^2));
    diffusion_opd: ||mean - mu_T||^2 / (2 variance) (`diffusion_opd_variance`); plus mar_weight times the same
    divergence to the anchor's mean when one is given and the weight > 0. Per-element advantages (credit
    "element") take per-element log-probs (B, ...): each element's PPO-clip term, reduced by `reduction`.
    """
    if estimator == "diffusion_opd":
        if variance is None:
            raise ValueError("diffusion_opd's loss needs the variance w_t (diffusion_opd_variance)")

        def divergence(target):
            return mean_gap(mean, target, variance, reduction)
    else:
        def divergence(target):
            return step_kl(mean, target, std, reduction)
    ratio = None
    if estimator in ("analytic_grad", "diffusion_opd"):
        policy = divergence(mean_teacher)
    elif estimator in PPO_ESTIMATORS:
        policy, ratio = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_eps)
        policy = reduce_elements(policy, reduction) if policy.ndim > 1 else policy
    else:
        raise ValueError(f"estimator {estimator!r} has no per-step loss (one of {', '.join(ESTIMATORS[:4])})")
    loss, mar_kl = policy, None
    if mean_anchor is not None and mar_weight > 0:
        mar_kl = divergence(mean_anchor)
        loss = loss + mar_weight * mar_kl
    return loss, {"policy": policy, "ratio": ratio, "mar_kl": mar_kl}


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


def as_velocity(model):
    """A bundle (model.velocity(x, sigma, cond, cfg=...)) or a callable velocity(x, sigma, cond, cfg)."""
    if hasattr(model, "velocity"):
        return lambda x, sigma, cond, cfg: model.velocity(x, sigma, cond, cfg=cfg)
    if callable(model):
        return model
    raise TypeError(f"a teacher or anchor must be a bundle or a velocity callable, got {type(model).__name__}")


# ---------------------------------------------------------------- the trainer
class OPDTrainer(Trainer):
    """Multi-teacher OPD on a bundle; `step(k)` runs rollout, teacher targets and update for step k.

    prompts: the training pool; routes[i]: the teacher of prompt i (a key of `teachers`, "base" included when
    used); teachers / anchor: bundles or velocity callables, frozen. anchor None or mar_weight 0: no MAR. When the
    anchor is one of the teacher objects, its rows reuse that teacher's forward. The rollout draws GRPO's streams
    (same prompts, noise and timesteps per step). processes: this process's share of the batch
    (flowopd.distributed); rewards are gathered so advantages are the whole batch's. init_adapter: starting weights
    of the student's LoRA adapter (sd3: the cold start's merged adapter).
    """

    progress_keys = ("reward", "kl", "v_mse", "clip_frac")

    def __init__(self, bundle, settings, prompts, routes, teachers: dict, anchor=None, mar_weight: float = 0.0, *,
                 seed: int = 0, lora=None, init_adapter: dict | None = None, processes: Processes | None = None):
        sampler, estimator = settings.sampler, settings.estimator
        (processes or Processes()).rows(settings.prompts_per_step * settings.group_size)  # refuses a bad split
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if estimator in SDE_ESTIMATORS and sampler.noise_level <= 0:
            raise ValueError(f"OPD's {estimator} estimator needs the SDE sampler (sampler.noise_level > 0) for its "
                             "Gaussian steps; diffusion_opd and velocity_mse also take the ODE")
        if sampler.steps < 2:
            raise ValueError("OPD needs sampler.steps >= 2 (the last step, to sigma 0, is never trained)")
        if len(routes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(routes)} routes")
        unknown = sorted(set(routes) - set(teachers))
        if unknown:
            raise ValueError(f"prompts routed to {unknown}, which no teacher model was given for "
                             f"(given: {', '.join(teachers) or 'none'})")
        super().__init__(bundle, settings, seed=seed, lora=lora, init_adapter=init_adapter, processes=processes)
        self.prompts = list(prompts)
        self.teacher_names = [name for name in teachers if name in set(routes)]  # curve columns, stable order
        self.prompt_tasks = np.array([self.teacher_names.index(r) for r in routes])  # rollout.tasks: teacher index
        self.teachers = {name: as_velocity(teachers[name]) for name in self.teacher_names}
        self.mar_weight = float(mar_weight)
        self.anchor = as_velocity(anchor) if anchor is not None and self.mar_weight > 0 else None
        self.anchor_alias = next((n for n in self.teacher_names if teachers[n] is anchor), None)

    def rollout(self, step: int):
        s = self.settings
        return draw_rollout(self.bundle, self.prompts, self.prompt_tasks, s.sampler, s.prompts_per_step,
                            s.group_size, self.seed, step, self.processes, decode=False)

    # -- 2. frozen targets ------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_velocities(self, x: Tensor, sigma, cond, tasks: np.ndarray, cfg: float):
        """(v_T, v_A or None) at x (sigma: a float or one per row): one forward per teacher over its rows, then
        the anchor's over the rows another teacher teaches (the anchor teacher's own rows reuse its forward)."""
        device = x.device

        def velocities(velocity, rows):
            return velocity(x[rows], sigma if isinstance(sigma, float) else sigma[rows], cond.index(rows), cfg)

        v_teacher = torch.empty(x.shape, dtype=torch.float32, device=device)
        for k, name in enumerate(self.teacher_names):
            rows = torch.as_tensor(np.flatnonzero(tasks == k), device=device)
            if len(rows):
                v_teacher[rows] = velocities(self.teachers[name], rows)
        v_anchor = None
        if self.anchor is not None:
            v_anchor = torch.empty_like(v_teacher)
            shared = tasks == (self.teacher_names.index(self.anchor_alias) if self.anchor_alias else -1)
            if shared.any():
                rows = torch.as_tensor(np.flatnonzero(shared), device=device)
                v_anchor[rows] = v_teacher[rows]
            rows = torch.as_tensor(np.flatnonzero(~shared), device=device)
            if len(rows):
                v_anchor[rows] = velocities(self.anchor, rows)
        return v_teacher, v_anchor

    @torch.no_grad()
    def targets(self, rollout, t: int, cfg: float) -> tuple[Tensor, Tensor | None, Tensor]:
        """(mu_T, mu_A or None, std) at trained step t, the step means of the targets' velocities."""
        traj, noise_level = rollout.trajectory, self.settings.sampler.noise_level
        x, sigma, sigma_next = traj.latents[t], traj.sigmas[t].item(), traj.sigmas[t + 1].item()
        v_teacher, v_anchor = self.target_velocities(x, sigma, rollout.cond, rollout.tasks, cfg)
        teacher_mean, std = sde_step_mean_std(x, v_teacher, sigma, sigma_next, noise_level)
        anchor_mean = None if v_anchor is None else sde_step_mean_std(x, v_anchor, sigma, sigma_next, noise_level)[0]
        return teacher_mean, anchor_mean, std

    # -- 3. rewards -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rewards(self, rollout, steps: list[int], targets: dict, common: dict) -> Tensor:
        """(T, B) per-step rewards of the trained steps, under the rollout policy (before any update); credit
        "element": (T, B, ...) per element."""
        traj, rows = rollout.trajectory, []
        for t in steps:
            mean_teacher, _, std = targets[t]
            # traj.means[t]: the rollout policy's own step mean, which x_{t+1} was drawn around
            rows.append(step_rewards(self.settings.estimator, traj.latents[t + 1], traj.means[t], mean_teacher, std,
                                     traj.log_probs[t], common["reduction"], self.settings.credit))
        return torch.stack(rows)

    def student_step(self, x, x_next, sigma: float, sigma_next: float, cond, common: dict):
        """(log p_theta(x_next | x) or None on the ODE, mu_theta, std) with grad: the student's step at x."""
        if common["noise_level"] > 0:
            return step_log_prob(self.bundle, x, x_next, sigma, sigma_next, cond, **common)
        velocity = self.bundle.velocity(x, sigma, cond, cfg=common["cfg"])
        return None, *sde_step_mean_std(x, velocity, sigma, sigma_next, 0.0)

    # -- 4. update --------------------------------------------------------------------------------------------
    def update(self, rollout, step: int) -> dict:
        """The dense estimators: every trained step of every rollout."""
        s, sampler, traj = self.settings, self.settings.sampler, rollout.trajectory
        reduction, noise_level = sampler.logprob_reduction, sampler.noise_level
        cfg = sampler.cfg if s.cfg_train else 1.0
        common = {"cfg": cfg, "noise_level": noise_level, "reduction": reduction}
        steps = trained_steps(sampler.steps, s.timestep_fraction, step_rng(self.seed, TIMESTEP_STREAM, step))
        t0 = time.perf_counter()
        targets = {t: self.targets(rollout, t, cfg) for t in steps}
        advantages, processes = None, self.processes
        element = s.credit == "element" and s.estimator in PPO_ESTIMATORS  # per-element rewards and ratios
        if s.estimator in PPO_ESTIMATORS:
            rewards = self.rewards(rollout, steps, targets, common)
            if processes.count > 1:  # (T, B, ...) of the whole batch: the per-step statistics are the batch's
                whole = processes.gather(rewards.movedim(1, 0).cpu().numpy())
                rewards = torch.as_tensor(whole, dtype=rewards.dtype, device=rewards.device).movedim(0, 1)
            advantages = step_advantages(rewards, s.reward_to_go, s.normalize_advantage)
            if processes.count > 1:
                advantages = advantages[:, processes.rows(advantages.shape[1])]
        t1 = time.perf_counter()
        stats, by_teacher = defaultdict(list), defaultdict(list)
        self.bundle.transformer.train()
        for epoch in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for i, t in enumerate(steps):
                x, x_next = traj.latents[t], traj.latents[t + 1]
                sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
                mean_teacher, mean_anchor, _ = targets[t]
                log_prob, mean, std = self.student_step(x, x_next, sigma, sigma_next, rollout.cond, common)
                policy_log_prob, old_log_prob = log_prob, None if traj.log_probs is None else traj.log_probs[t]
                if element:  # each element's own ratio, against the rollout's step mean
                    policy_log_prob = gaussian_log_prob(x_next, mean, std, "none")
                    old_log_prob = gaussian_log_prob(x_next, traj.means[t], std, "none")
                variance = diffusion_opd_variance(sigma, sigma_next, noise_level) if s.estimator == "diffusion_opd" \
                    else None
                per_sample, terms = step_loss(
                    s.estimator, policy_log_prob, old_log_prob, mean, mean_teacher, std,
                    None if advantages is None else advantages[i], s.clip_eps, reduction, mean_anchor,
                    self.mar_weight, variance)
                loss = per_sample.mean() / (len(steps) * processes.count)  # summed over processes
                loss.backward()
                stats["loss"].append(loss.item() * len(steps) * processes.count)  # this process's mean
                stats["policy_loss"].append(terms["policy"].detach().mean().item())
                if log_prob is not None:
                    stats["approx_kl"].append((0.5 * (log_prob.detach() - traj.log_probs[t]) ** 2).mean().item())
                if terms["ratio"] is not None:
                    stats["clip_frac"].append(((terms["ratio"].detach() - 1).abs() > s.clip_eps).float().mean().item())
                if terms["mar_kl"] is not None:
                    stats["mar_kl"].append(terms["mar_kl"].detach().mean().item())
                if epoch == 0:  # the distance to the routed teacher under the rollout policy
                    gap = velocity_gap(mean.detach(), mean_teacher, sigma, sigma_next, noise_level)
                    kl = step_kl(mean.detach(), mean_teacher, std, reduction) if noise_level > 0 else None
                    self._log_distance(stats, by_teacher, rollout.tasks, kl, reduce_elements(gap**2, "mean"))
            stats["grad_norm"].append(self.optimizer_step())
        self.bundle.transformer.eval()
        row = self._reduce(stats, by_teacher)
        if advantages is not None:
            per_reward = traj.latents[0][0].numel() if element else 1  # elements per reward
            row["reward"] = rewards.mean().item() * per_reward / nats_per_unit(traj.latents[0], reduction)  # = -kl
        else:  # minus the divergence the loss differentiates: the KL under the rollout policy, or the mean gap
            row["reward"] = -row["kl"] if s.estimator == "analytic_grad" else -row["policy_loss"]
        row["teacher_s"] = t1 - t0
        return row

    def query_update(self, rollout, step: int) -> dict:
        """velocity_mse: one state per rollout, x_q at the step q drawn for it (DanceOPD)."""
        s, sampler, traj, processes = self.settings, self.settings.sampler, rollout.trajectory, self.processes
        reduction, noise_level = sampler.logprob_reduction, sampler.noise_level
        cfg = sampler.cfg if s.cfg_train else 1.0
        batch = s.prompts_per_step * s.group_size  # drawn for the whole batch, so every process draws alike
        q = query_steps(step_rng(self.seed, TIMESTEP_STREAM, step), batch, sampler.steps, s.query)
        q = torch.as_tensor(q[processes.rows(batch)], device=traj.latents.device)
        rows = torch.arange(len(q), device=q.device)
        x, sigma, sigma_next = traj.latents[q, rows], traj.sigmas[q], traj.sigmas[q + 1]
        t0 = time.perf_counter()
        v_teacher, v_anchor = self.target_velocities(x, sigma, rollout.cond, rollout.tasks, cfg)
        t1 = time.perf_counter()
        stats, by_teacher = defaultdict(list), defaultdict(list)
        self.bundle.transformer.train()
        for epoch in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            velocity = self.bundle.velocity(x, sigma, rollout.cond, cfg=cfg)
            policy = velocity_mse(velocity, v_teacher, reduction)
            per_sample = policy
            if v_anchor is not None:
                mar = velocity_mse(velocity, v_anchor, reduction)
                per_sample = per_sample + self.mar_weight * mar
                stats["mar_kl"].append(mar.detach().mean().item())
            loss = per_sample.mean() / processes.count  # summed over processes
            loss.backward()
            stats["loss"].append(loss.item() * processes.count)
            stats["policy_loss"].append(policy.detach().mean().item())
            if epoch == 0:
                kl = None
                if noise_level > 0:  # the Gaussian step KL at the queried states, on an SDE rollout
                    means = [sde_step_mean_std(x, v, sigma, sigma_next, noise_level) for v in (velocity, v_teacher)]
                    kl = step_kl(means[0][0].detach(), means[1][0], means[0][1], reduction)
                gap = velocity.detach() - v_teacher
                self._log_distance(stats, by_teacher, rollout.tasks, kl, reduce_elements(gap**2, "mean"))
            stats["grad_norm"].append(self.optimizer_step())
        self.bundle.transformer.eval()
        row = self._reduce(stats, by_teacher)
        row["reward"] = -row["policy_loss"]
        row["teacher_s"] = t1 - t0
        return row

    def _log_distance(self, stats, by_teacher, tasks: np.ndarray, kl: Tensor | None, v_mse: Tensor) -> None:
        """The curve's distance to the routed teacher: the step KL (SDE rollouts) overall and per teacher, and
        the velocity MSE at the trained states (every estimator, so their curves compare)."""
        stats["v_mse"].append(v_mse.mean().item())
        if kl is None:
            return
        stats["kl"].append(kl.mean().item())
        for k, name in enumerate(self.teacher_names):
            rows = torch.as_tensor(tasks == k, device=kl.device)
            n = int(rows.sum())
            by_teacher[name].append(self.processes.pooled_mean(kl[rows].mean().item() if n else 0.0, n))

    def _reduce(self, stats, by_teacher) -> dict:
        for key in sorted(stats):  # per-process means over equal shares (same keys everywhere)
            if key != "grad_norm":
                stats[key] = self.processes.mean(stats[key])
        row = {key: float(np.mean(values)) for key, values in stats.items()}
        by_teacher = {name: [v for v in values if not np.isnan(v)] for name, values in by_teacher.items()}
        return row | {f"kl_{name}": float(np.mean(by_teacher[name])) if by_teacher.get(name) else None
                      for name in self.teacher_names}

    # -- one whole step ---------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        rollout = self.rollout(step)
        t1 = time.perf_counter()
        update = self.query_update if self.settings.estimator == "velocity_mse" else self.update
        stats = update(rollout, step)
        t2 = time.perf_counter()
        row = {"step": step, "reward": stats["reward"], "kl": stats.get("kl")}
        row |= {f"kl_{name}": stats[f"kl_{name}"] for name in self.teacher_names}
        for key in ("v_mse", "mar_kl", "loss", "policy_loss", "clip_frac", "approx_kl", "grad_norm"):
            row[key] = stats.get(key)  # None (an empty cell): no MAR, no PPO ratio, no SDE
        teacher_s = stats["teacher_s"]
        row |= {"rollout_s": round(t1 - t0, 4), "teacher_s": round(teacher_s, 4),
                "train_s": round(t2 - t1 - teacher_s, 4)}
        return row


# ---------------------------------------------------------------- the phase
def run_opd(spec, init_dir: Path, base_dir: Path | None, teacher_dirs: dict, data_dir: Path, out: Path,
            curve_path: Path | None = None, progress: bool = True) -> None:
    """OPD from the cold-start artifact `init_dir` on all tasks' train prompts; writes `out` atomically (the EMA
    student: a TinyBundle, or an sd3 adapter; curve.csv, provenance). Resumes from `<out>.ckpt` like every
    trainer (flowopd.trainer). sd3: student, teachers and anchor are adapters on ONE frozen base (sd3_models)."""
    from flowopd.router import Router, format_summary, training_prompts

    started, start, settings = now(), time.time(), spec.opd
    processes = Processes.from_environment()
    prompts, tasks = training_prompts(spec, data_dir)
    router = Router.from_spec(spec)
    routes = router.route_all(prompts, tasks)
    counts = router.summary(prompts, tasks)
    if processes.is_main:
        print(format_summary(counts))
    anchor_name = spec.mar.anchor if spec.mar.weight > 0 else None
    needed = [*counts, *([anchor_name] if anchor_name and anchor_name not in counts else [])]
    if spec.model.kind == "tiny":
        student, models = tiny_models(init_dir, needed, teacher_dirs, base_dir)
        lora, init_adapter = lora_settings(spec, settings), None
    else:
        student, models, lora, init_adapter = sd3_models(spec, init_dir, needed, teacher_dirs, processes.device)
    trainer = OPDTrainer(student, settings, prompts, routes, {n: models[n] for n in counts},
                         models.get(anchor_name), spec.mar.weight, seed=spec.seed, lora=lora,
                         init_adapter=init_adapter, processes=processes)
    if spec.model.kind == "sd3":
        student.set_adapter(ADAPTER)  # the student rolls out; teachers switch in per forward (adapter_velocity)
    folders = {n: base_dir if n == "base" else teacher_dirs[n] for n in models if n != "base" or base_dir}
    inputs = {"init_sha256": weights_sha(init_dir), "teachers": {n: weights_sha(f) for n, f in folders.items()}}
    prompt_digest = hashlib.sha256("\n".join(f"{t}\t{p.text}" for p, t in zip(prompts, tasks)).encode()).hexdigest()
    provenance = {
        "estimator": settings.estimator, "routing": counts, "anchor": anchor_name, "mar_weight": spec.mar.weight,
        "init_dir": str(init_dir), "init_sha256": inputs["init_sha256"],
        "teachers": {n: {"dir": str(f), "sha256": inputs["teachers"][n]} for n, f in folders.items()},
    }
    run_training(trainer, spec=spec, phase="opd", out=out, sub_spec=opd_sub_spec(spec),
                 inputs={"inputs": inputs, "prompts": prompt_digest}, provenance=provenance, started=started,
                 start=start, curve_path=curve_path, progress=progress)


def tiny_models(init_dir: Path, names: list[str], teacher_dirs: dict, base_dir: Path | None):
    """The student (the cold-start TinyBundle) and the named teachers ("base" included) as frozen TinyBundles."""
    from flowopd.models.loading import load_teachers
    from flowopd.models.tiny import TinyBundle

    student = TinyBundle.load(init_dir)
    models = load_teachers(names, teacher_dirs, base_dir, config=student.config)
    student_text = student.text_encoder.state_dict()
    for name, model in models.items():
        if any(not torch.equal(v, student_text[k]) for k, v in model.text_encoder.state_dict().items()):
            raise SystemExit(f"{name}'s text encoder differs from the student's: OPD evaluates every teacher on the "
                             "student's prompt embeddings, so all must share the frozen encoder")
    return student, models


def sd3_models(spec, init_dir: Path, names: list[str], teacher_dirs: dict, device):
    """The adapter plan: ONE frozen SD3 base; each named teacher's adapter loaded beside it (frozen), "base" the
    bare base. -> (bundle, {name: velocity}, the student's LoRA settings, its starting adapter or None).
    The student starts from the cold start's adapter (merge) or, without one (none), a fresh adapter (B = 0)."""
    from flowopd.models.loading import load_bundle, require_teacher_dirs
    from flowopd.models.sd3 import ADAPTER_WEIGHTS, read_adapter
    from flowopd.spec import LoraSettings

    if ADAPTER in names:
        raise SystemExit(f"a teacher may not be named {ADAPTER!r}: the student's adapter has that name")
    require_teacher_dirs(names, teacher_dirs)
    bundle = load_bundle(spec, None, device)
    for name in names:
        if name != "base":
            bundle.load_adapter(name, teacher_dirs[name], trainable=False)
    velocities = {name: bundle.adapter_velocity(None if name == "base" else name) for name in names}
    if (Path(init_dir) / ADAPTER_WEIGHTS).exists():
        init_adapter, config = read_adapter(init_dir)
        return bundle, velocities, LoraSettings(**config), init_adapter
    lora = lora_settings(spec, spec.opd)
    if lora is None:
        raise SystemExit("OPD on sd3 trains a LoRA adapter beside the teachers' on one frozen base: set opd.lora "
                         "or model.lora")
    return bundle, velocities, lora, None


def stage_main(argv: list[str] | None = None) -> None:
    """Command line of stages/opd.py (FLOWOPD_PROCESSES=N: N processes)."""
    from flowopd.cold_start import parse_teacher_dirs, stage_parser
    from flowopd.phases import check_stage_key
    from flowopd.spec import load_spec_or_exit

    if argv is None:
        relaunch_if_asked()
    parser = stage_parser("opd")
    parser.add_argument("--init", required=True, type=Path, help="cold-start artifact folder (the student)")
    parser.add_argument("--curve", type=Path, help="also write the training curve here (DVC plots)")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required: OPD rolls out on the train prompts")
    spec = load_spec_or_exit(args.spec)
    check_stage_key(spec, args.spec, "opd", args.out)
    teacher_dirs = parse_teacher_dirs(args.teacher, spec)
    run_opd(spec, args.init, args.base, teacher_dirs, args.data, args.out, args.curve, not args.no_progress)

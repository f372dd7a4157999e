"""Multi-teacher on-policy distillation with Manifold Anchor Regularisation: the trainer
(docs/method.md#on-policy-distillation; its objectives are flowopd.methods.opd_objectives, its phase
flowopd.phases.opd).

One OPD step k:
1. rollouts: the student samples P prompts x G (flowopd.train.rollouts, GRPO's seeded streams): the SDE, storing
   x_{s_0} ... x_{s_T}, log p_old(x_{t+1} | x_t) and the step means, or (noise_level 0) the Euler ODE; each sample's
   prompt was routed to ONE teacher beforehand;
2. targets, under no_grad, one forward per teacher over the rows routed to it: the teacher's velocity v_T at the
   student's own x_t, same s, same condition, same CFG, and its step mean mu_T (the anchor's v_A, mu_A with MAR);
3. the estimator (`opd.estimator`) turns them into a loss. Step means mu = x + d [v + sd^2 / (2 s) (x + (1 - s) v)],
   d = s' - s, std = sd sqrt(-d) (flowopd.flow.sde); on the ODE sd = 0 and mu = x + d v. Dense estimators train the
   trained steps t (a share of all but the last); per-step rewards are in nats of the whole step (`step_rewards`):
     sampled        r_t = log N(x_{t+1}; mu_T, std^2) - log p_old(x_{t+1} | x_t)   L_t = PPO-clip(A_t)   E[r_t] = -KL
     analytic       r_t = -KL(N(mu_old, std^2) || N(mu_T, std^2)), constant in x_{t+1}  L_t = PPO-clip(A_t)
     analytic_grad  L_t = KL(N(mu_S, std^2) || N(mu_T, std^2)) = ||mu_S - mu_T||^2 / (2 std^2), differentiated
     diffusion_opd  L_t = ||mu_S - mu_T||^2 / (2 w_t), w_t = 1 on the ODE, sd(s)^2 on the SDE
                    (DiffusionOPD, arXiv 2605.15055: its training script's per-step KL; docs/estimators.md)
     velocity_mse   L = ||v_S(x_q) - v_T(x_q)||^2 at ONE state x_q per rollout, q drawn from `opd.query`'s range
                    of low-noise steps (DanceOPD, arXiv 2606.27377)
     reference_kl   A_t = clamp(kl_scale D_t, +-adv_clip), D_t = mean_d (mu_S - mu_T)^2 / (2 sd(s)^2) with the
                    student's gradient, PPO-clip over all pairs (A_i, r_j) of the batch (Flow-OPD's released code)
     gkd            L_t = D_t, differentiated (Flow-OPD's released code, `reward_mode: gkd`)
   (reduced over elements by the sampler's log-prob reduction). A_t = r_t, or the reward-to-go sum_{t' >= t} r_t',
   optionally standardised per step; credit "element" keeps each latent element's own log-ratio r_{t,d} as the
   advantage of that element's log-prob (per-token OPD with the elements as tokens);
4. MAR: L_t += lambda D(student step || anchor step), D the estimator's own divergence (the KL; diffusion_opd's
   mean gap; velocity_mse's velocity MSE), lambda = mar.weight; one clipped AdamW update per inner epoch;
5. every `ema.every` steps the EMA of the weights moves (flowopd.train.trainer); the EMA is what the phase saves.
Samples routed to "base" are taught by the base model.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from flowopd.flow.sde import divergence_scale, gaussian_log_prob, reduce_elements, sde_step_mean_std, step_kl
from flowopd.methods.opd_objectives import (
    diffusion_opd_variance,
    nats_per_unit,
    query_steps,
    step_advantages,
    step_loss,
    step_rewards,
    velocity_gap,
    velocity_mse,
)
from flowopd.models.bundle import Condition, micro_batches
from flowopd.runtime.processes import Processes
from flowopd.spec import ReferenceKLSettings
from flowopd.spec.choices import PPO_ESTIMATORS, REFERENCE_ESTIMATORS
from flowopd.train.policy import step_log_prob
from flowopd.train.rollouts import draw_rollout, trained_steps
from flowopd.train.streams import TIMESTEP_STREAM, step_rng
from flowopd.train.trainer import Trainer


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
    (flowopd.runtime.processes); rewards are gathered so advantages are the whole batch's. init_adapter: starting weights
    of the student's LoRA adapter (sd3: the cold start's merged adapter).
    """

    progress_keys = ("reward", "kl", "v_mse", "clip_frac")

    def __init__(self, bundle, settings, prompts, routes, teachers: dict, anchor=None, mar_weight: float = 0.0, *,
                 seed: int = 0, lora=None, init_adapter: dict | None = None, processes: Processes | None = None):
        # settings: a validated OPDSettings (its estimator fits its sampler; flowopd.spec.training)
        (processes or Processes()).rows(settings.prompts_per_step * settings.group_size)  # refuses a bad split
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
                            s.group_size, self.seed, step, self.processes, decode=False, micro_batch=s.micro_batch)

    # -- 2. frozen targets ------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_velocities(self, x: Tensor, sigma, cond, tasks: np.ndarray, cfg: float):
        """(v_T, v_A or None) at x (sigma: a float or one per row): one forward per teacher over its rows, then
        the anchor's over the rows another teacher teaches (the anchor teacher's own rows reuse its forward); each
        in micro-batches of at most `micro_batch` of those rows."""
        device = x.device

        def velocities(velocity, rows):
            parts = [rows[part] for part in micro_batches(len(rows), self.settings.micro_batch)]
            return torch.cat([velocity(x[part], sigma if isinstance(sigma, float) else sigma[part], cond.index(part),
                                       cfg) for part in parts])

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
        return self.step_targets(rollout, [t], cfg)[t]

    @torch.no_grad()
    def step_targets(self, rollout, steps: list[int], cfg: float) -> dict[int, tuple[Tensor, Tensor | None, Tensor]]:
        """{t: (mu_T, mu_A or None, std)} at every trained step t. The targets' forwards are batched over the
        steps (sigma per row): each teacher sees its rows of all trained steps at once, in micro-batches of at most
        `micro_batch` rows, instead of a few rows per step (a forward over 4 rows costs 1.5x per row what one over
        20 does on 2 CPU cores)."""
        traj, noise_level = rollout.trajectory, self.settings.sampler.noise_level
        batch = traj.latents.shape[1]
        x = traj.latents[steps].flatten(0, 1)  # (len(steps) B, ...): step-major, like the tiles below
        sigma = traj.sigmas[steps].repeat_interleave(batch)
        cond = Condition.cat([rollout.cond] * len(steps))
        v_teacher, v_anchor = self.target_velocities(x, sigma, cond, np.tile(rollout.tasks, len(steps)), cfg)
        out = {}
        for i, t in enumerate(steps):
            rows, sigma_t, sigma_next = slice(i * batch, (i + 1) * batch), traj.sigmas[t].item(), \
                traj.sigmas[t + 1].item()
            teacher_mean, std = sde_step_mean_std(x[rows], v_teacher[rows], sigma_t, sigma_next, noise_level)
            anchor_mean = None if v_anchor is None else \
                sde_step_mean_std(x[rows], v_anchor[rows], sigma_t, sigma_next, noise_level)[0]
            out[t] = (teacher_mean, anchor_mean, std)
        return out

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

    def mar_scale(self, sigma: float, sigma_next: float) -> float:
        """MAR's KL in the sampler's kl_form: 1 (the step KL) or Flow-GRPO's s - s' (the reference code's MAR is
        beta times Flow-GRPO's D); the logged mar_kl stays the step KL."""
        sampler = self.settings.sampler
        return float(divergence_scale(sigma, sigma_next, sampler.kl_form, sampler.sde))

    def micro_step_loss(self, rollout, t: int, rows: slice, target: tuple, advantages: Tensor | None,
                        common: dict) -> tuple[Tensor, dict]:
        """One micro-batch (`rows`) of trained step t: the student's step with grad and the estimator's loss.
        -> (per-sample loss, terms: the estimator's policy / ratio / mar_kl and the student's log_prob, mean, std)."""
        s, traj = self.settings, rollout.trajectory
        x, x_next = traj.latents[t][rows], traj.latents[t + 1][rows]
        sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
        mean_teacher, mean_anchor, _ = target
        log_prob, mean, std = self.student_step(x, x_next, sigma, sigma_next, rollout.cond.index(rows), common)
        policy_log_prob, old_log_prob = log_prob, None if traj.log_probs is None else traj.log_probs[t][rows]
        if s.credit == "element" and s.estimator in PPO_ESTIMATORS:  # each element's own ratio, against the
            policy_log_prob = gaussian_log_prob(x_next, mean, std, "none")  # rollout's step mean
            old_log_prob = gaussian_log_prob(x_next, traj.means[t][rows], std, "none")
        # diffusion_opd's w_t; the reference estimators' std_dev_t^2 = sd(s)^2 (our step std is sd(s) sqrt(s - s'))
        variance = diffusion_opd_variance(sigma, sigma_next, common["noise_level"]) \
            if s.estimator in ("diffusion_opd", *REFERENCE_ESTIMATORS) else None
        reference = s.reference_kl or ReferenceKLSettings()
        per_sample, terms = step_loss(
            s.estimator, policy_log_prob, old_log_prob, mean, mean_teacher[rows], std,
            None if advantages is None else advantages[rows], s.clip_eps, common["reduction"],
            None if mean_anchor is None else mean_anchor[rows], self.mar_weight * self.mar_scale(sigma, sigma_next),
            variance, reference.kl_scale, reference.adv_clip)
        return per_sample, terms | {"log_prob": log_prob, "mean": mean, "std": std}

    # -- 4. update --------------------------------------------------------------------------------------------
    def update(self, rollout, step: int) -> dict:
        """The dense estimators: every trained step of every rollout."""
        s, sampler, traj = self.settings, self.settings.sampler, rollout.trajectory
        reduction, noise_level = sampler.logprob_reduction, sampler.noise_level
        cfg = sampler.cfg if s.cfg_train else 1.0
        common = {"cfg": cfg, "noise_level": noise_level, "reduction": reduction}
        steps = trained_steps(sampler.steps, s.timestep_fraction, step_rng(self.seed, TIMESTEP_STREAM, step))
        t0 = time.perf_counter()
        targets = self.step_targets(rollout, steps, cfg)
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
        micro = micro_batches(traj.latents.shape[1], s.micro_batch)  # the rollout's split: ratio 1 at first
        stats, by_teacher = defaultdict(list), defaultdict(list)
        self.bundle.transformer.train()
        for epoch in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for i, t in enumerate(steps):
                sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
                parts = defaultdict(list)  # this step's per-sample terms over the micro-batches, detached
                for rows in micro:  # one forward and backward each: the gradients accumulate
                    per_sample, terms = self.micro_step_loss(rollout, t, rows, targets[t],
                                                             None if advantages is None else advantages[i], common)
                    share = (rows.stop - rows.start) / traj.latents.shape[1]  # of this process's mean
                    (per_sample.mean() * share / (len(steps) * processes.count)).backward()  # summed over processes
                    for name, value in (("per_sample", per_sample), *terms.items()):
                        if value is not None:
                            parts[name].append(value.detach())
                whole = {name: torch.cat(values) for name, values in parts.items()}
                loss = whole["per_sample"].mean() / (len(steps) * processes.count)
                stats["loss"].append(loss.item() * len(steps) * processes.count)  # this process's mean
                stats["policy_loss"].append(whole["policy"].mean().item())
                if "log_prob" in whole:
                    stats["approx_kl"].append((0.5 * (whole["log_prob"] - traj.log_probs[t]) ** 2).mean().item())
                if "ratio" in whole:
                    stats["clip_frac"].append(((whole["ratio"] - 1).abs() > s.clip_eps).float().mean().item())
                if "mar_kl" in whole:
                    stats["mar_kl"].append(whole["mar_kl"].mean().item())
                if epoch == 0 and "advantages" in whole:  # reference_kl's, under the rollout policy
                    stats["advantage"].append(whole["advantages"].mean().item())
                if epoch == 0:  # the distance to the routed teacher under the rollout policy
                    mean, mean_teacher = whole["mean"], targets[t][0]
                    gap = velocity_gap(mean, mean_teacher, sigma, sigma_next, noise_level)
                    kl = step_kl(mean, mean_teacher, whole["std"], reduction) if noise_level > 0 else None
                    self._log_distance(stats, by_teacher, rollout.tasks, kl, reduce_elements(gap**2, "mean"))
            stats["grad_norm"].append(self.optimizer_step())
        self.bundle.transformer.eval()
        row = self._reduce(stats, by_teacher)
        if advantages is not None:
            per_reward = traj.latents[0][0].numel() if element else 1  # elements per reward
            row["reward"] = rewards.mean().item() * per_reward / nats_per_unit(traj.latents[0], reduction)  # = -kl
        elif s.estimator == "reference_kl":  # its advantage kl_scale D (clamped) is its per-step reward
            row["reward"] = row["advantage"]
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
        micro = micro_batches(len(x), s.micro_batch)
        for epoch in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            parts = defaultdict(list)  # per-sample terms over the micro-batches, detached
            for rows in micro:  # one forward and backward each: the gradients accumulate
                velocity = self.bundle.velocity(x[rows], sigma[rows], rollout.cond.index(rows), cfg=cfg)
                policy = velocity_mse(velocity, v_teacher[rows], reduction)
                per_sample = policy
                if v_anchor is not None:
                    mar = velocity_mse(velocity, v_anchor[rows], reduction)
                    per_sample = per_sample + self.mar_weight * mar
                    parts["mar"].append(mar.detach())
                share = (rows.stop - rows.start) / len(x)  # of this process's mean
                (per_sample.mean() * share / processes.count).backward()  # summed over processes
                for name, value in (("velocity", velocity), ("policy", policy), ("per_sample", per_sample)):
                    parts[name].append(value.detach())
            velocity, policy, per_sample = (torch.cat(parts[name]) for name in ("velocity", "policy", "per_sample"))
            if parts["mar"]:
                stats["mar_kl"].append(torch.cat(parts["mar"]).mean().item())
            loss = per_sample.mean() / processes.count
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

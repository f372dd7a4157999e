"""Flow-GRPO (arXiv 2505.05470) on any model bundle: single-reward task teachers and the mixed-reward baseline.

One GRPO step (docs/method.md#teachers-flow-grpo):
1. rollouts: P prompts x G SDE samples each, storing x_{s_0} ... x_{s_T} and log p_old(x_{t+1} | x_t);
2. rewards R of the decoded images; advantages A = (R - mean_group) / (std + 1e-4), std over the group or over the
   whole step ("global"), clipped to +-adv_clip; a group whose rewards are all equal carries no signal and is
   dropped from the loss (it still rides along in the batch, so the training batch is the sampling batch);
3. per inner epoch, for the trained steps t (a share of them, never the last step to sigma 0):
       r   = exp(log p_theta(x_{t+1} | x_t) - log p_old(x_{t+1} | x_t))       velocity recomputed at the stored x_t
       L_t = mean_kept( max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta KL(p_theta step || p_ref step) )
   gradients accumulate over the trained steps (L = mean_t L_t), then one clipped AdamW update;
4. every `ema.every` steps the EMA of the weights moves; the EMA is what the phase saves.

Rollouts, rewards and advantages are flowopd.train.rollouts's; the step loop, EMA, checkpoints and the artifact are
flowopd.train.trainer's; the teacher and baseline phases that run this trainer are flowopd.methods.reward_trainers'.

Mixed rewards (the baseline): each task's reward scores the samples of its own prompts (their dataset of origin, as
Flow-OPD's mixed training routes rewards), R = w_task * reward_task. `joint` normalises R; `per_reward` normalises
each reward's column on its own and sums w_k A_k.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from flowopd.flow.sde import step_divergence
from flowopd.models.bundle import micro_batches
from flowopd.runtime.processes import Processes
from flowopd.train.losses import ppo_clip_loss
from flowopd.train.policy import FrozenReference, step_log_prob
from flowopd.train.rollouts import RewardRollouts, trained_steps
from flowopd.train.streams import TIMESTEP_STREAM, step_rng
from flowopd.train.trainer import Trainer


# ---------------------------------------------------------------- the trainer
class GRPOTrainer(RewardRollouts, Trainer):
    """Flow-GRPO on a bundle; `step(k)` runs rollout, reward and update for step k (flowopd.train.trainer drives it).

    prompts: the training prompt pool; prompt_tasks[i]: index into `rewards` of the reward scoring prompt i;
    reward_names label the curve columns (reward_<name>). lora: LoraSettings to train an adapter, None: all
    transformer weights. Everything random at step k derives from (seed, k), so a resumed run draws alike.
    kept_rows_only: the update runs on the kept groups' samples only, faster by the dropped share, but the training
    batch then differs from the sampling batch (docs/method.md#teachers-flow-grpo advises against it for SD3 on GPU; the tiny model on CPU
    gives bitwise-equal velocities for a sub-batch). Off by default, and off over several processes.
    processes: this process's share of the batch (flowopd.runtime.processes); the default is a single process.
    """

    progress_keys = ("reward", "kl", "clip_frac", "kept_groups")
    curve_keys = ("loss", "policy_loss", "kl", "clip_frac", "approx_kl", "grad_norm")  # kl: None at beta 0

    def __init__(self, bundle, settings, prompts, prompt_tasks, rewards, reward_names, weights, *,
                 advantage: str = "joint", seed: int = 0, lora=None, kept_rows_only: bool = False,
                 processes: Processes | None = None):
        # settings: a validated GRPOSettings (SDE rollouts of at least 2 steps; flowopd.spec.training)
        (processes or Processes()).rows(settings.prompts_per_step * settings.group_size)  # refuses a bad split
        super().__init__(bundle, settings, seed=seed, lora=lora, processes=processes)
        self.prompts, self.prompt_tasks = list(prompts), np.asarray(prompt_tasks)
        self.rewards, self.reward_names = list(rewards), list(reward_names)
        self.weights, self.advantage = np.asarray(weights, dtype=np.float64), advantage
        self.kept_rows_only = kept_rows_only and self.processes.count == 1
        self.reference = FrozenReference(bundle, lora=lora is not None) if settings.beta > 0 else None

    # -- PPO update ----------------------------------------------------------------------------------------
    def update(self, rollout, advantages: np.ndarray, kept: np.ndarray, step: int) -> dict:
        """Inner epochs of PPO-clip + beta KL over the trained steps; one optimizer step per epoch.

        advantages, kept: of the whole batch; this process trains its rows, weighted by 1 / (kept in the batch).
        """
        s, sampler, traj = self.settings, self.settings.sampler, rollout.trajectory
        stats = defaultdict(list)
        if not kept.any():
            return {}
        device = traj.latents.device
        adv = torch.as_tensor(advantages, dtype=torch.float32, device=device)
        weight = torch.as_tensor(kept, dtype=torch.float32, device=device)
        weight = weight / weight.sum()  # mean over kept samples
        if self.processes.count > 1:
            rows = self.processes.rows(len(adv))
            adv, weight = adv[rows], weight[rows]
        latents, old_log_probs, cond = traj.latents, traj.log_probs, rollout.cond
        if self.kept_rows_only:
            rows = torch.as_tensor(np.flatnonzero(kept), device=device)
            latents, old_log_probs, cond = latents[:, rows], old_log_probs[:, rows], cond.index(rows)
            adv, weight = adv[rows], weight[rows]
        cfg = sampler.cfg if s.cfg_train else 1.0
        steps = trained_steps(sampler.steps, s.timestep_fraction, step_rng(self.seed, TIMESTEP_STREAM, step),
                              traj.stochastic)
        common = {"cfg": cfg, "noise_level": sampler.noise_level, "reduction": sampler.logprob_reduction,
                  "sde": sampler.sde}
        # the rollout's split (draw_rollout), so the recomputed log-probs are the rollout's: ratio 1 at first
        micro = micro_batches(latents.shape[1], s.micro_batch)
        reference_means = {}  # the reference is frozen: its step means are computed once per rollout
        self.bundle.transformer.train()
        for _ in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for t in steps:
                x, x_next = latents[t], latents[t + 1]
                sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
                if self.reference is not None and t not in reference_means:
                    reference_means[t] = torch.cat([
                        step_log_prob(self.bundle, x[rows], x_next[rows], sigma, sigma_next, cond.index(rows),
                                      velocity_fn=self.reference.velocity, **common)[1] for rows in micro])
                terms = defaultdict(list)  # this step's per-sample terms over the micro-batches, detached
                for rows in micro:  # one forward and backward each: the gradients accumulate
                    log_prob, mean, std = step_log_prob(self.bundle, x[rows], x_next[rows], sigma, sigma_next,
                                                        cond.index(rows), **common)
                    policy, ratio = ppo_clip_loss(log_prob, old_log_probs[t][rows], adv[rows], s.clip_eps)
                    per_sample = policy
                    if self.reference is not None:
                        kl = step_divergence(mean, reference_means[t][rows], std, sigma, sigma_next,
                                             sampler.logprob_reduction, sampler.kl_form, sampler.sde)
                        per_sample = per_sample + s.beta * kl
                        terms["kl"].append(kl.detach())
                    ((per_sample * weight[rows]).sum() / len(steps)).backward()
                    for name, value in (("log_prob", log_prob), ("policy", policy), ("ratio", ratio),
                                        ("per_sample", per_sample)):
                        terms[name].append(value.detach())
                log_prob, policy, ratio, per_sample = (torch.cat(terms[name]) for name in
                                                       ("log_prob", "policy", "ratio", "per_sample"))
                if terms["kl"]:
                    stats["kl"].append((torch.cat(terms["kl"]) * weight).sum().item())
                loss = (per_sample * weight).sum() / len(steps)
                stats["policy_loss"].append((policy.detach() * weight).sum().item())
                stats["loss"].append(loss.item() * len(steps))
                stats["clip_frac"].append(((ratio.detach() - 1).abs() > s.clip_eps).float().mul(weight).sum().item())
                stats["approx_kl"].append((0.5 * (log_prob.detach() - old_log_probs[t]) ** 2 * weight).sum().item())
            stats["grad_norm"].append(self.optimizer_step())
        self.bundle.transformer.eval()
        return self.summed_stats(stats)

"""DiffusionNFT (Zheng et al., arXiv 2509.16117): negative-aware reward fine-tuning on the forward process.

No log-probabilities and no SDE: NFT fits the model to its own clean samples with flow matching, contrasting the
good ones with the bad ones. One step k:
1. rollouts: P prompts x G samples from the *sampling policy* v_old (an EMA of the trained weights that trails
   them, `old_decay`), with any sampler (the deterministic ODE by default);
2. rewards R, group advantages A = (R - mean_group) / (std_group + eps) clipped to +-c, and the optimality
   probability r = clip(A / (2c) + 1/2, 0, 1) (paper eq. 8's r, Flow-Factory's normalisation);
3. per sample, `train_times` noise levels t drawn from the sampler's grid and fresh noise n,
       x_t = (1 - t) x0 + t n,      v_old = v_old(x_t) (no grad),      v = v_theta(x_t)
   the implicit positive and negative policies (paper eq. 6)
       v+ = (1 - beta) v_old + beta v,          v- = (1 + beta) v_old - beta v
   and the loss (paper eq. 9, in the x0-prediction form with the adaptive weight of the reference code)
       L = [ r ||x0^(v+) - x0||^2 / w+  +  (1 - r) ||x0^(v-) - x0||^2 / w- ] / beta,
       x0^(u) = x_t - t u,   w = mean |x0^(u) - x0| (detached, >= 1e-5),   mean over elements
   plus kl_beta ||v - v_ref||^2 (a velocity-space KL to the frozen starting model, AWM's / NFT's regulariser);
4. one clipped AdamW step per inner epoch over all samples; v_old <- EMA(v_old, v_theta); the saved-weights EMA.

Why it is stable where plain reward-weighted flow matching on own samples drifts: at v = v_old the gradient is
beta (2r - 1) (v_old - (n - x0)) t^2 / w per sample, and (2r - 1) has mean zero over a group, so whatever the
group's samples share (the sampler's own artefacts) cancels; only what separates good from bad samples moves the
model, and the v_old anchor keeps each step a trust region of size ~1 / beta.

CFG: the policy is the guided sampler v_u + cfg (v_c - v_u) that the evaluation runs. `cfg_train: true` trains
that guided velocity with the unconditional branch detached (so the shared unconditional model, which every task's
prompts use, does not move); `false` trains the conditional velocity alone on samples drawn at cfg 1.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from flowopd.flow.sde import sigma_schedule
from flowopd.models.bundle import micro_batches
from flowopd.runtime.processes import Processes
from flowopd.train.policy import FrozenReference
from flowopd.train.rollouts import RewardRollouts, group_advantages
from flowopd.train.streams import TIMESTEP_STREAM, step_generator
from flowopd.train.trainer import Trainer

X0_WEIGHT_MIN = 1e-5


def optimality(advantages: np.ndarray, clip: float) -> np.ndarray:
    """r = clip(A / (2 clip) + 1/2, 0, 1): advantages clipped to +-clip mapped onto [0, 1] (0.5: the group mean)."""
    return np.clip(np.clip(advantages, -clip, clip) / (2 * clip) + 0.5, 0.0, 1.0)


def nft_optimality(rewards, group_size: int, clip: float, std: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """rewards (N,) in groups of G -> (r (N,) in [0, 1], kept (N,) bool: groups whose rewards differ)."""
    advantages, kept = group_advantages(rewards, group_size, std, clip)
    return optimality(advantages, clip), kept


def x0_fit(x_t: Tensor, t: Tensor, velocity: Tensor, x0: Tensor) -> Tensor:
    """||x0^ - x0||^2 / w per sample, x0^ = x_t - t v, w = mean |x0^ - x0| detached (the reference code's weight)."""
    dims = tuple(range(1, x0.ndim))
    error = x_t - t * velocity - x0
    weight = error.detach().abs().mean(dims, keepdim=True).clamp(min=X0_WEIGHT_MIN)
    return (error**2 / weight).mean(dims)


def nft_loss(x_t: Tensor, t: Tensor, x0: Tensor, v: Tensor, v_old: Tensor, r: Tensor, beta: float) -> Tensor:
    """Per-sample NFT loss (B,): [r fit(v+) + (1 - r) fit(v-)] / beta, v+- the implicit policies (module doc).

    x_t, x0, v, v_old: (B, ...); t: (B, 1, ...) noise levels; r: (B,) optimality in [0, 1]; v_old detached.
    """
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    return (r * x0_fit(x_t, t, positive, x0) + (1 - r) * x0_fit(x_t, t, negative, x0)) / beta


# ---------------------------------------------------------------- the trainer
class NFTTrainer(RewardRollouts, Trainer):
    """DiffusionNFT on a bundle; `step(k)` runs rollout, rewards and update, then moves the old policy.

    The constructor, prompt pool, rewards, rollout streams and processes are GRPOTrainer's; settings are the
    spec's NFTMethod. The rollouts sample the old policy (OldPolicy) with the method's sampler; the flow-matching
    noise levels and noise of step k come from the TIMESTEP_STREAM, drawn for the whole batch, so several processes
    train their rows exactly as one process trains all of them.
    """

    progress_keys = ("reward", "loss", "kept_groups")
    curve_keys = ("loss", "policy_loss", "kl", "grad_norm")

    def __init__(self, bundle, settings, prompts, prompt_tasks, rewards, reward_names, weights, *,
                 advantage: str = "joint", seed: int = 0, lora=None, processes: Processes | None = None):
        (processes or Processes()).rows(settings.prompts_per_step * settings.group_size)  # refuses a bad split
        super().__init__(bundle, settings, seed=seed, lora=lora, processes=processes)
        self.prompts, self.prompt_tasks = list(prompts), np.asarray(prompt_tasks)
        self.rewards, self.reward_names = list(rewards), list(reward_names)
        self.weights, self.advantage = np.asarray(weights, dtype=np.float64), advantage
        self.reference = FrozenReference(bundle, lora=lora is not None) if settings.kl_beta > 0 else None
        self.old = OldPolicy(bundle, self.named_params, settings.old_decay)

    def sampling_transformer(self):
        return self.old.transformer

    def update(self, rollout, advantages: np.ndarray, kept: np.ndarray, step: int) -> dict:
        """advantages, kept: the whole batch's (clipped at adv_clip); this process trains its rows, weighted by
        1 / (kept samples in the batch)."""
        s, x0 = self.settings, rollout.trajectory.latents[-1]
        if not kept.any():
            return {}
        device = x0.device
        r = torch.as_tensor(optimality(advantages, s.adv_clip), dtype=torch.float32, device=device)
        weight = torch.as_tensor(kept, dtype=torch.float32, device=device)
        weight = weight / weight.sum()
        rows = self.processes.rows(len(r))
        r, weight = r[rows], weight[rows]
        grid = sigma_schedule(s.sampler.steps, s.sampler.shift)[:-1]  # the sampler's noise levels, sigma 0 left out
        grid = grid[: max(1, round(s.time_fraction * len(grid)))]
        cfg = s.sampler.cfg if s.cfg_train else 1.0
        generator = step_generator(self.seed, TIMESTEP_STREAM, step)
        whole = len(r) * self.processes.count
        stats = defaultdict(list)
        self.bundle.transformer.train()
        for _ in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(s.train_times):
                t = grid[torch.randint(len(grid), (whole,), generator=generator)][rows].to(device)
                noise = torch.randn((whole, *x0.shape[1:]), generator=generator)[rows].to(device)
                t = t.view(-1, *[1] * (x0.ndim - 1))
                x_t = (1 - t) * x0 + t * noise
                terms = defaultdict(list)  # per-sample terms over the micro-batches, detached
                for part in micro_batches(len(x0), s.micro_batch):  # one forward and backward each
                    fit, kl = self.micro_loss(x_t[part], t[part], x0[part], r[part], rollout.cond.index(part), cfg)
                    per_sample = fit if kl is None else fit + s.kl_beta * kl
                    ((per_sample * weight[part]).sum() / s.train_times).backward()
                    terms["fit"].append(fit.detach())
                    terms["per_sample"].append(per_sample.detach())
                    if kl is not None:
                        terms["kl"].append(kl.detach())
                stats["policy_loss"].append((torch.cat(terms["fit"]) * weight).sum().item())
                if terms["kl"]:
                    stats["kl"].append((torch.cat(terms["kl"]) * weight).sum().item())
                loss = (torch.cat(terms["per_sample"]) * weight).sum() / s.train_times
                stats["loss"].append(loss.item() * s.train_times)
            stats["grad_norm"].append(self.optimizer_step())
        self.bundle.transformer.eval()
        self.old.update(self.named_params)
        return self.summed_stats(stats)

    def micro_loss(self, x_t, t, x0, r, cond, cfg: float) -> tuple[Tensor, Tensor | None]:
        """(NFT loss, velocity KL to the reference or None) per sample of one micro-batch, with grad."""
        with torch.no_grad():
            v_old = guided_velocity(self.bundle, x_t, t.flatten(), cond, cfg, self.old.transformer)
        v = guided_velocity(self.bundle, x_t, t.flatten(), cond, cfg, None)
        fit = nft_loss(x_t, t, x0, v, v_old, r, self.settings.beta)
        if self.reference is None:
            return fit, None
        v_ref = self.reference.velocity(x_t, t.flatten(), cond, cfg)
        return fit, (v - v_ref).pow(2).flatten(1).mean(1)

    def state_dict(self) -> dict:
        return super().state_dict() | {"old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old.load_state_dict(state["old"])


def guided_velocity(bundle, x, sigma, cond, cfg: float, transformer) -> Tensor:
    """v_u + cfg (v_c - v_u) with the unconditional branch detached; the conditional one alone at cfg 1."""
    conditional = bundle.velocity(x, sigma, cond, cfg=1.0, transformer=transformer)
    if cfg == 1.0:
        return conditional
    with torch.no_grad():
        unconditional = bundle.velocity(x, sigma, bundle.null_condition(len(x)), cfg=1.0, transformer=transformer)
    return unconditional + cfg * (conditional - unconditional)


class OldPolicy:
    """The sampling policy v_old: a frozen copy of the transformer, moved towards the trained weights after every
    step by theta_old <- d theta_old + (1 - d) theta (d = old_decay; 0: the weights of the last step)."""

    def __init__(self, bundle, named_params: dict, decay: float):
        self.decay = decay
        self.transformer = copy.deepcopy(bundle.transformer).requires_grad_(False).eval()
        self.names = list(named_params)
        self.shadow = dict(self.transformer.named_parameters())

    @torch.no_grad()
    def update(self, named_params: dict) -> None:
        for name in self.names:
            self.shadow[name].lerp_(named_params[name].detach().to(self.shadow[name].dtype), 1 - self.decay)

    def state_dict(self) -> dict:
        return {name: self.shadow[name].detach().clone() for name in self.names}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in self.names:
                self.shadow[name].copy_(state[name])

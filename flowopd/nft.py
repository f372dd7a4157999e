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

from flowopd.grpo import GRPOTrainer, group_advantages
from flowopd.sde import sigma_schedule
from flowopd.training import step_generator

TRAIN_NOISE_STREAM = 4  # noise levels and noise of the flow-matching targets (grpo uses streams 1-3)

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
class NFTTrainer(GRPOTrainer):
    needs_log_probs = False

    """DiffusionNFT on a bundle; `step(k)` runs rollout, rewards, update, the old policy's and the saved EMA.

    The same constructor, prompts, rewards, rollout streams, processes and checkpoints as GRPOTrainer (driven by
    grpo.train()); settings are an NFTMethod. The rollout samples the old policy (a frozen copy of the
    transformer moved towards the trained one by EMA after every step) with the method's sampler.
    """

    def __init__(self, bundle, settings, prompts, prompt_tasks, rewards, reward_names, weights, *,
                 advantage: str = "joint", seed: int = 0, lora=None, kept_rows_only: bool = False,
                 processes=None):
        super().__init__(bundle, settings, prompts, prompt_tasks, rewards, reward_names, weights,
                         advantage=advantage, seed=seed, lora=lora, kept_rows_only=kept_rows_only,
                         processes=processes, reference=settings.kl_beta > 0)
        self.old = OldPolicy(bundle, self.named_params, settings.old_decay)
        if self.kept_rows_only:  # the update selects rows itself; trains on the whole batch
            self.kept_rows_only = False

    def sampling_transformer(self):
        return self.old.transformer

    def update(self, rollout, advantages: np.ndarray, kept: np.ndarray, step: int) -> dict:
        """advantages: the whole batch's group advantages (clipped); this process trains its rows."""
        s, traj = self.settings, rollout.trajectory
        if not kept.any():
            return {}
        x0 = traj.latents[-1]
        device = x0.device
        r = torch.as_tensor(optimality(advantages, s.adv_clip), dtype=torch.float32, device=device)
        weight = torch.as_tensor(kept, dtype=torch.float32, device=device)
        weight = weight / weight.sum()
        rows = self.processes.rows(len(r))
        r, weight = r[rows], weight[rows]
        grid = sigma_schedule(s.sampler.steps, s.sampler.shift)[:-1]  # the sampler's noise levels (no sigma 0)
        grid = grid[: max(1, round(s.time_fraction * len(grid)))]
        cfg = s.sampler.cfg if s.cfg_train else 1.0
        stats = defaultdict(list)
        self.bundle.transformer.train()
        for epoch in range(s.inner_epochs):
            generator = step_generator(self.seed, TRAIN_NOISE_STREAM, step * 1000 + epoch)
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(s.train_times):
                whole = len(r) * self.processes.count
                t = grid[torch.randint(len(grid), (whole,), generator=generator)][rows].to(device)
                noise = torch.randn((whole, *x0.shape[1:]), generator=generator)[rows].to(device)
                t = t.view(-1, *[1] * (x0.ndim - 1))
                x_t = (1 - t) * x0 + t * noise
                sigma = t.flatten()
                with torch.no_grad():
                    v_old = guided_velocity(self.bundle, x_t, sigma, rollout.cond, cfg, self.old.transformer)
                v = guided_velocity(self.bundle, x_t, sigma, rollout.cond, cfg, None)
                per_sample = nft_loss(x_t, t, x0, v, v_old, r, s.beta)
                stats["policy_loss"].append((per_sample.detach() * weight).sum().item())
                if self.reference is not None:
                    v_ref = self.reference.velocity(x_t, sigma, rollout.cond, cfg)
                    kl = ((v - v_ref) ** 2).flatten(1).mean(1)
                    per_sample = per_sample + s.kl_beta * kl
                    stats["kl"].append((kl.detach() * weight).sum().item())
                loss = (per_sample * weight).sum() / s.train_times
                loss.backward()
                stats["loss"].append(loss.item() * s.train_times)
            self.processes.sum_gradients(self.params)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip or float("inf"))
            stats["grad_norm"].append(grad_norm.item())
            self.optimizer.step()
        self.bundle.transformer.eval()
        self.old.update(self.named_params)
        for key in sorted(stats):
            if key != "grad_norm":
                stats[key] = self.processes.sum(stats[key])
        return {key: float(np.mean(values)) for key, values in stats.items()}

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

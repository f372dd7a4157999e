"""This project's SDE step, log-prob and GRPO loss against Flow-GRPO's own code, on fixed tensors.

    python benchmarks/flow_grpo_parity.py --reference path/to/flow_grpo/diffusers_patch/sd3_sde_with_logprob.py

The reference file is Flow-GRPO's (github.com/yifan123/flow_grpo), fetched by the user and not shipped here: its
`sde_step_with_logprob(scheduler, velocity, timestep, sample, noise_level, prev_sample, generator)` is called with a
diffusers FlowMatchEulerDiscreteScheduler at SD3's settings (10 steps, shift 3), and its GRPO loss is the expression of
its `scripts/train_sd3.py` (PPO-clip of the advantages plus beta times ||mu - mu_ref||^2 / (2 std_dev_t^2), averaged),
written out below from the values the reference returns. Ours: flowopd.flow.sde.sde_step with kl_form "flow_grpo",
flowopd.train.losses.ppo_clip_loss. For every trained step (all but the last, to sigma 0) it compares the step mean, the
step std, the log-prob of the reference's own sample, and the loss, and prints the largest relative error of each;
it exits 1 when one exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowopd.flow.sde import sde_step, sigma_schedule, step_divergence
from flowopd.train.losses import ppo_clip_loss


def load_reference(path: Path):
    """The user's copy of Flow-GRPO's sd3_sde_with_logprob.py as a module (a file they chose to run)."""
    spec = importlib.util.spec_from_file_location("flow_grpo_reference", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sde_step_with_logprob"):
        raise SystemExit(f"{path}: has no sde_step_with_logprob")
    return module.sde_step_with_logprob


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30)).item()


def compare(reference, steps: int = 10, shift: float = 3.0, noise_level: float = 0.7, batch: int = 4,
            shape=(16, 8, 8), beta: float = 0.04, clip_eps: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Largest relative error of each quantity over the trained steps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = sigma_schedule(steps, shift)
    generator = torch.Generator().manual_seed(seed)
    errors = {"sigma schedule": relative_error(sigmas, scheduler.sigmas.float())}
    worst = {"step mean": 0.0, "step std": 0.0, "log-prob": 0.0, "GRPO loss (policy + beta KL)": 0.0}
    for j in range(steps - 1):
        x, v_old, v_ref = (torch.randn(batch, *shape, generator=generator) for _ in range(3))
        v_new = v_old + 1e-3 * torch.randn(batch, *shape, generator=generator)  # the policy after some updates
        advantages = torch.randn(batch, generator=generator).clamp(-5, 5)
        timestep = scheduler.timesteps[j].repeat(batch)
        sample_generator = torch.Generator().manual_seed(seed + j)
        x_next, old_log_prob, _, _ = reference(scheduler, v_old, timestep, x, noise_level=noise_level,
                                               generator=sample_generator)
        _, log_prob, mean, std_dev_t = reference(scheduler, v_new, timestep, x, noise_level=noise_level,
                                                 prev_sample=x_next)
        _, _, mean_ref, _ = reference(scheduler, v_ref, timestep, x, noise_level=noise_level, prev_sample=x_next)
        dt = scheduler.sigmas[j + 1] - scheduler.sigmas[j]
        ratio = torch.exp(log_prob - old_log_prob)  # train_sd3.py's GRPO loss, from the reference's values
        policy = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
        kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
        their_loss = policy.mean() + beta * kl.mean()

        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        our_old = sde_step(x, v_old, s, s_next, noise_level, prev_sample=x_next)[1]
        _, our_log_prob, our_mean, our_std = sde_step(x, v_new, s, s_next, noise_level, prev_sample=x_next)
        _, _, our_mean_ref, _ = sde_step(x, v_ref, s, s_next, noise_level, prev_sample=x_next)
        our_policy, _ = ppo_clip_loss(our_log_prob, our_old, advantages, clip_eps)
        our_kl = step_divergence(our_mean, our_mean_ref, our_std, s, s_next, "mean", "flow_grpo")
        our_loss = our_policy.mean() + beta * our_kl.mean()
        for name, ours, theirs in (("step mean", our_mean, mean),
                                   ("step std", our_std.flatten(), (std_dev_t * torch.sqrt(-dt)).flatten()),
                                   ("log-prob", our_log_prob, log_prob),
                                   ("GRPO loss (policy + beta KL)", our_loss, their_loss)):
            worst[name] = max(worst[name], relative_error(ours, theirs))
    return errors | worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="Flow-GRPO's sd3_sde_with_logprob.py")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error accepted")
    args = parser.parse_args(argv)
    errors = compare(load_reference(args.reference))
    width = max(map(len, errors))
    for name, error in errors.items():
        print(f"{name:<{width}}  largest relative error {error:.2e}")
    failed = [name for name, error in errors.items() if error > args.tolerance]
    if failed:
        print(f"above {args.tolerance:g}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

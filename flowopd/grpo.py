"""Flow-GRPO (arXiv 2505.05470) on any model bundle: single-reward task teachers and the mixed-reward baseline.

One GRPO step (method.md section 2):
1. rollouts: P prompts x G SDE samples each, storing x_{s_0} ... x_{s_T} and log p_old(x_{t+1} | x_t);
2. rewards R of the decoded images; advantages A = (R - mean_group) / (std + 1e-4), std over the group or over the
   whole step ("global"), clipped to +-adv_clip; a group whose rewards are all equal carries no signal and is
   dropped from the loss (it still rides along in the batch, so the training batch is the sampling batch);
3. per inner epoch, for the trained steps t (a share of them, never the last step to sigma 0):
       r   = exp(log p_theta(x_{t+1} | x_t) - log p_old(x_{t+1} | x_t))       velocity recomputed at the stored x_t
       L_t = mean_kept( max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta KL(p_theta step || p_ref step) )
   gradients accumulate over the trained steps (L = mean_t L_t), then one clipped AdamW update;
4. every `ema.every` steps the EMA of the weights moves; the EMA is what the phase saves.

Mixed rewards (the baseline): each task's reward scores the samples of its own prompts (their dataset of origin, as
Flow-OPD's mixed training routes rewards), R = w_task * reward_task. `joint` normalises R; `per_reward` normalises
each reward's column on its own and sums w_k A_k.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowopd.artifacts import atomic_folder, canonical_hash, now, sha256_file, write_provenance
from flowopd.distributed import Processes, relaunch_if_asked
from flowopd.models.base import Condition
from flowopd.phases import baseline_sub_spec, teacher_sub_spec
from flowopd.sampling import Trajectory, sample
from flowopd.sde import step_kl
from flowopd.training import (
    EMA,
    Checkpoints,
    FrozenReference,
    checkpoint_folder,
    make_optimizer,
    prepare_policy,
    rng_state,
    save_policy,
    set_rng_state,
    step_generator,
    step_log_prob,
    step_rng,
)

PROMPT_STREAM, NOISE_STREAM, TIMESTEP_STREAM = 1, 2, 3  # independent random streams per step
ADV_EPS = 1e-4


# ---------------------------------------------------------------- advantages
def group_advantages(
    rewards, group_size: int, std: str = "group", clip: float = 5.0, eps: float = ADV_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """rewards (N,) in consecutive groups of G -> (advantages (N,), kept (N,) bool).

    A = (R - mean_group) / (std + eps), std over the group ("group") or over all N rewards ("global"), population
    std as Flow-GRPO's PerPromptStatTracker; clipped to +-clip. Zero-variance groups: A = 0 and kept = False.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    group_std = r.std(axis=1, keepdims=True)
    if std == "group":
        denominator = group_std
    elif std == "global":
        denominator = r.std()
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    kept = np.broadcast_to(group_std > 0, r.shape)
    advantages = np.clip((r - r.mean(axis=1, keepdims=True)) / (denominator + eps), -clip, clip)
    return np.where(kept, advantages, 0.0).reshape(-1), kept.reshape(-1).copy()


def mixed_advantages(
    scores: np.ndarray, weights, group_size: int, mode: str = "joint", std: str = "group", clip: float = 5.0,
    eps: float = ADV_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """scores (N, K), NaN where reward k does not score sample n; weights (K,) -> (advantages (N,), kept (N,)).

    joint: A from R = sum_k w_k score_k. per_reward: A = sum_k w_k A_k, each A_k normalised over the samples
    reward k scores (whole groups), then clipped. One reward (a teacher): both are group_advantages(score).
    """
    scores, weights = np.asarray(scores, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if mode == "joint":
        return group_advantages(np.nansum(scores * weights, axis=1), group_size, std, clip, eps)
    if mode != "per_reward":
        raise ValueError(f"mode must be 'joint' or 'per_reward', got {mode!r}")
    advantages, kept = np.zeros(len(scores)), np.zeros(len(scores), dtype=bool)
    for k, weight in enumerate(weights):
        rows = ~np.isnan(scores[:, k])
        if not rows.any() or weight == 0:
            continue
        if rows.sum() % group_size:
            raise ValueError(f"reward {k} scores {rows.sum()} samples, not whole groups of {group_size}")
        a_k, kept_k = group_advantages(scores[rows, k], group_size, std, np.inf, eps)
        advantages[rows] += weight * a_k
        kept[rows] |= kept_k
    return np.clip(advantages, -clip, clip), kept


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


def trained_steps(sampler_steps: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """Which steps a rollout trains: all but the last one (to sigma 0), or a random share of them (sorted)."""
    candidates = sampler_steps - 1
    n = max(1, min(candidates, round(fraction * candidates)))
    if n == candidates:
        return list(range(candidates))
    return sorted(rng.choice(candidates, size=n, replace=False).tolist())


# ---------------------------------------------------------------- rewards of a rollout
def score_matrix(images: np.ndarray, prompts: list, tasks: np.ndarray, rewards: list) -> np.ndarray:
    """(N, K) scores: reward k scores the samples whose prompt comes from task k; NaN elsewhere."""
    scores = np.full((len(prompts), len(rewards)), np.nan)
    for k, reward in enumerate(rewards):
        rows = np.flatnonzero(tasks == k)
        if len(rows):
            scores[rows, k] = reward(images[rows], [prompts[i] for i in rows])["score"]
    return scores


# ---------------------------------------------------------------- the trainer
@dataclass
class Rollout:
    """One step's samples: each chosen prompt G times in a row (this process's rows of them)."""

    prompts: list  # (N,) flowopd.world.Prompt
    tasks: np.ndarray  # (N,) index of the reward scoring each sample
    cond: Condition  # (N, ...)
    trajectory: Trajectory  # latents (T+1, N, ...), log_probs (T, N) under the rollout policy
    images: np.ndarray  # (N, H, W, 3) uint8


class GRPOTrainer:
    """Flow-GRPO on a bundle; `step(k)` runs rollout, reward, update and EMA for step k.

    prompts: the training prompt pool; prompt_tasks[i]: index into `rewards` of the reward scoring prompt i;
    reward_names label the curve columns (reward_<name>). lora: LoraSettings to train an adapter, None: all
    transformer weights. Everything random at step k derives from (seed, k), so a resumed run draws alike.
    kept_rows_only: the update runs on the kept groups' samples only, faster by the dropped share, but the training
    batch then differs from the sampling batch (method.md advises against it for SD3 on GPU; the tiny model on CPU
    gives bitwise-equal velocities for a sub-batch). Off by default, and off over several processes.
    processes: this process's share of the batch (flowopd.distributed); the default is a single process.
    """

    def __init__(self, bundle, settings, prompts, prompt_tasks, rewards, reward_names, weights, *,
                 advantage: str = "joint", seed: int = 0, lora=None, kept_rows_only: bool = False,
                 processes: Processes | None = None):
        sampler = settings.sampler
        self.processes = processes or Processes()
        self.processes.rows(settings.prompts_per_step * settings.group_size)  # refuses a batch that does not split
        if sampler.noise_level <= 0:
            raise ValueError("GRPO needs the SDE sampler (sampler.noise_level > 0) for its log-probs")
        if sampler.steps < 2:
            raise ValueError("GRPO needs sampler.steps >= 2 (the last step, to sigma 0, is never trained)")
        self.bundle, self.settings, self.seed = bundle, settings, seed
        self.prompts, self.prompt_tasks = list(prompts), np.asarray(prompt_tasks)
        self.rewards, self.reward_names = list(rewards), list(reward_names)
        self.weights, self.advantage = np.asarray(weights, dtype=np.float64), advantage
        self.kept_rows_only = kept_rows_only and self.processes.count == 1
        torch.manual_seed(seed)  # LoRA's gaussian A
        self.named_params = prepare_policy(bundle, lora)
        self.params = list(self.named_params.values())
        self.reference = FrozenReference(bundle, lora=lora is not None) if settings.beta > 0 else None
        self.optimizer = make_optimizer(self.params, settings.lr)
        self.ema = EMA(self.params, settings.ema.decay, settings.ema.every) if settings.ema else None

    # -- 1. rollouts ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        s, sampler, group, processes = self.settings, self.settings.sampler, self.settings.group_size, self.processes
        rng = step_rng(self.seed, PROMPT_STREAM, step)
        chosen = rng.choice(len(self.prompts), size=s.prompts_per_step, replace=s.prompts_per_step > len(self.prompts))
        cond = self.bundle.encode([self.prompts[i].text for i in chosen]).repeat_interleave(group)
        rows = processes.rows(len(cond))
        if processes.count > 1:
            cond = cond.index(rows)
        self.bundle.transformer.eval()
        x, trajectory = sample(
            self.bundle, cond, steps=sampler.steps, shift=sampler.shift, cfg=sampler.cfg,
            noise_level=sampler.noise_level, generator=step_generator(self.seed, NOISE_STREAM, step),
            return_trajectory=True, log_prob_reduction=sampler.logprob_reduction,
            share=(processes.index, processes.count),
        )
        prompts = [self.prompts[i] for i in chosen for _ in range(group)][rows]
        tasks = np.repeat(self.prompt_tasks[chosen], group)[rows]
        return Rollout(prompts, tasks, cond, trajectory, self.bundle.decode(x))

    # -- 2. rewards and advantages -------------------------------------------------------------------------
    def score(self, rollout: Rollout) -> np.ndarray:
        """(N, K) scores of the whole batch: each process scores its own rows, then they are gathered."""
        return self.processes.gather(score_matrix(rollout.images, rollout.prompts, rollout.tasks, self.rewards))

    def advantages(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        return mixed_advantages(scores, self.weights, s.group_size, self.advantage, s.adv_std, s.adv_clip)

    # -- 3. PPO update -------------------------------------------------------------------------------------
    def update(self, rollout: Rollout, advantages: np.ndarray, kept: np.ndarray, step: int) -> dict:
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
        steps = trained_steps(sampler.steps, s.timestep_fraction, step_rng(self.seed, TIMESTEP_STREAM, step))
        common = {"cfg": cfg, "noise_level": sampler.noise_level, "reduction": sampler.logprob_reduction}
        reference_means = {}  # the reference is frozen: its step means are computed once per rollout
        self.bundle.transformer.train()
        for _ in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for t in steps:
                x, x_next = latents[t], latents[t + 1]
                sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
                log_prob, mean, std = step_log_prob(self.bundle, x, x_next, sigma, sigma_next, cond, **common)
                policy, ratio = ppo_clip_loss(log_prob, old_log_probs[t], adv, s.clip_eps)
                per_sample = policy
                if self.reference is not None:
                    if t not in reference_means:
                        reference_means[t] = step_log_prob(self.bundle, x, x_next, sigma, sigma_next, cond,
                                                           velocity_fn=self.reference.velocity, **common)[1]
                    kl = step_kl(mean, reference_means[t], std, sampler.logprob_reduction)
                    per_sample = per_sample + s.beta * kl
                    stats["kl"].append((kl.detach() * weight).sum().item())
                loss = (per_sample * weight).sum() / len(steps)
                loss.backward()
                stats["policy_loss"].append((policy.detach() * weight).sum().item())
                stats["loss"].append(loss.item() * len(steps))
                stats["clip_frac"].append(((ratio.detach() - 1).abs() > s.clip_eps).float().mul(weight).sum().item())
                stats["approx_kl"].append((0.5 * (log_prob.detach() - old_log_probs[t]) ** 2 * weight).sum().item())
            self.processes.sum_gradients(self.params)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip or float("inf"))
            stats["grad_norm"].append(grad_norm.item())
            self.optimizer.step()
        self.bundle.transformer.eval()
        for key in sorted(stats):  # each process's weighted sums add up to the batch's (same keys everywhere)
            if key != "grad_norm":
                stats[key] = self.processes.sum(stats[key])
        return {key: float(np.mean(values)) for key, values in stats.items()}

    # -- one whole step --------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        rollout = self.rollout(step)
        t1 = time.perf_counter()
        scores = self.score(rollout)
        advantages, kept = self.advantages(scores)
        t2 = time.perf_counter()
        stats = self.update(rollout, advantages, kept, step)
        if self.ema is not None:
            self.ema.step(self.params, step)
        t3 = time.perf_counter()
        total = np.nansum(scores * self.weights, axis=1)
        row = {"step": step, "reward": float(total.mean())}
        for k, name in enumerate(self.reward_names):
            column = scores[:, k]
            row[f"reward_{name}"] = float(np.nanmean(column)) if (~np.isnan(column)).any() else None
        row["kept_groups"] = float(kept.reshape(-1, self.settings.group_size)[:, 0].mean())
        for key in ("loss", "policy_loss", "kl", "clip_frac", "approx_kl", "grad_norm"):
            row[key] = stats.get(key)  # None (an empty cell) when nothing was trained or beta = 0
        row |= {"rollout_s": round(t1 - t0, 4), "reward_s": round(t2 - t1, 4), "train_s": round(t3 - t2, 4)}
        return row

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "params": {name: p.detach().clone() for name, p in self.named_params.items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.named_params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])

    def apply_ema(self) -> None:
        """Put the EMA weights into the model (what gets saved and evaluated); no-op without EMA."""
        if self.ema is not None:
            self.ema.copy_to(self.params)


def train(trainer: GRPOTrainer, steps: int, checkpoints: Checkpoints | None = None, checkpoint_every: int = 50,
          progress: bool = True, on_step=None, desc: str = "grpo") -> list[dict]:
    """Run steps [resumed step, steps); checkpoint every `checkpoint_every`. Returns the curve (one row per step).

    `on_step(step)` runs after each step and its checkpoint (tests interrupt a run there). Over several processes
    every one resumes from the same checkpoint; the main one alone shows the bar and writes checkpoints.
    """
    curve, first, elapsed = [], 0, 0.0
    is_main = trainer.processes.is_main
    state = checkpoints.load() if checkpoints is not None else None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        curve, first, elapsed = state["curve"], state["step"], state["seconds"]
        if is_main:
            print(f"resuming {desc} from step {first} ({checkpoints.path})")
    start = time.perf_counter() - elapsed
    bar = tqdm(range(first, steps), initial=first, total=steps, desc=desc, unit="step",
               disable=not progress or not is_main, dynamic_ncols=True)
    for step in bar:
        row = trainer.step(step)
        row["seconds"] = round(time.perf_counter() - start, 3)
        curve.append(row)
        bar.set_postfix({k: "-" if row[k] is None else f"{row[k]:.3g}"
                         for k in ("reward", "kl", "clip_frac", "kept_groups")})
        done = step + 1
        if checkpoints is not None and is_main and done % checkpoint_every == 0 and done < steps:
            checkpoints.save({"trainer": trainer.state_dict(), "curve": curve, "step": done,
                              "seconds": row["seconds"]})
        if on_step is not None:
            on_step(step)
    return curve


# ---------------------------------------------------------------- phases: teacher and baseline
def load_bundle(spec, base_dir: Path | None, device: torch.device | None = None):
    """The starting model: the tiny base artifact, or SD3 from its pretrained folder / hub id (on `device`, by
    default the GPU when present)."""
    if spec.model.kind == "tiny":
        from flowopd.models.tiny import TinyBundle

        if base_dir is None:
            raise SystemExit("a tiny spec starts from the base artifact: pass --base")
        return TinyBundle.load(base_dir)
    from flowopd.models.sd3 import SD3Bundle

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.model.dtype]
    bundle = SD3Bundle.from_pretrained(spec.model.pretrained, revision=spec.model.revision, dtype=dtype,
                                       resolution=spec.model.resolution)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return bundle.to(device) if device.type != "cpu" else bundle


def load_model(spec, folder: Path, device: torch.device | None = None):
    """A model artifact as a bundle: tiny: the whole TinyBundle; sd3: the pretrained base with the folder's adapter
    active (a folder without one, e.g. a `none` cold start: the bare base)."""
    if spec.model.kind == "tiny":
        from flowopd.models.tiny import TinyBundle

        return TinyBundle.load(folder)
    from flowopd.models.sd3 import ADAPTER_WEIGHTS

    bundle = load_bundle(spec, None, device)
    if (Path(folder) / ADAPTER_WEIGHTS).exists():
        bundle.load_adapter("model", folder)
        bundle.set_adapter("model")
    return bundle


def lora_settings(spec, settings):
    """The phase's own adapter, else the model's (sd3), else None: train all weights (tiny default)."""
    if settings.lora is not None:
        return settings.lora
    return spec.model.lora if spec.model.kind == "sd3" else None


def run_teacher(spec, name: str, base_dir: Path | None, data_dir: Path, out: Path, curve_path: Path | None = None,
                progress: bool = True) -> None:
    """Teacher `name`: single-reward GRPO on its task's train prompts from the base; writes `out` atomically."""
    from flowopd.data import read_prompts
    from flowopd.rewards import task_reward

    teacher = spec.teachers[name]
    task = spec.tasks[teacher.task]
    prompts = read_prompts(data_dir, teacher.task, "train")
    reward = task_reward(task, _world(spec))
    _run_phase(spec, "teacher", teacher_sub_spec(spec, name), teacher.grpo, base_dir, out, curve_path, progress,
               prompts, np.zeros(len(prompts), dtype=int), [reward], [teacher.task], [1.0], "joint",
               {"teacher": name, "task": teacher.task})


def run_baseline(spec, base_dir: Path | None, data_dir: Path, out: Path, curve_path: Path | None = None,
                 progress: bool = True) -> None:
    """Mixed-reward GRPO on all weighted tasks' train prompts (zero-weight tasks are left out)."""
    from flowopd.data import read_prompts
    from flowopd.rewards import task_reward

    baseline = spec.baseline
    if baseline is None:
        raise SystemExit("the spec has no baseline section")
    names = [task for task, weight in baseline.weights.items() if weight > 0]
    prompts, tasks = [], []
    for k, task in enumerate(names):
        task_prompts = read_prompts(data_dir, task, "train")
        prompts += task_prompts
        tasks += [k] * len(task_prompts)
    rewards = [task_reward(spec.tasks[task], _world(spec)) for task in names]
    weights = [baseline.weights[task] for task in names]
    _run_phase(spec, "baseline", baseline_sub_spec(spec), baseline.grpo, base_dir, out, curve_path, progress,
               prompts, np.array(tasks), rewards, names, weights, baseline.advantage, {"tasks": names})


def _world(spec):
    from flowopd.data import world_config

    return world_config(spec)


def _run_phase(spec, phase, sub_spec, settings, base_dir, out, curve_path, progress, prompts, prompt_tasks,
               rewards, names, weights, advantage, extra) -> None:
    from flowopd.phases import spec_identity, write_curve

    started, start = now(), time.time()
    out, processes = Path(out), Processes.from_environment()
    bundle = load_bundle(spec, base_dir, processes.device)
    base_weights = Path(base_dir) / "model.safetensors" if base_dir is not None else None
    base_sha = sha256_file(base_weights) if base_weights is not None and base_weights.exists() else None
    prompt_digest = hashlib.sha256("\n".join(p.text for p in prompts).encode()).hexdigest()
    lora = lora_settings(spec, settings)
    # On CPU the tiny model's velocities of a sub-batch are bitwise those of the whole batch, so training on the
    # kept groups only changes nothing but the time; SD3 on GPU keeps the sampling batch (method.md).
    trainer = GRPOTrainer(bundle, settings, prompts, prompt_tasks, rewards, names, weights, advantage=advantage,
                          seed=spec.seed, lora=lora, kept_rows_only=spec.model.kind == "tiny", processes=processes)
    fingerprint = canonical_hash({"sub_spec": sub_spec, "base_sha256": base_sha, "prompts": prompt_digest})
    checkpoints = Checkpoints(checkpoint_folder(out), fingerprint)
    curve = train(trainer, settings.steps, checkpoints, settings.checkpoint_every, progress, desc=f"{phase} {out.name}")
    trainer.apply_ema()
    if not processes.is_main:  # the same weights everywhere; the main process writes them
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = save_policy(bundle, folder, lora)
        write_curve(folder / "curve.csv", curve)
        write_provenance(
            folder, phase, sub_spec, **spec_identity(spec), **extra, curve=curve, processes=processes.count,
            base_dir=None if base_dir is None else str(base_dir), base_sha256=base_sha, lora=lora is not None,
            trainable_parameters=sum(p.numel() for p in trainer.params), steps=settings.steps,
            train_seconds=curve[-1]["seconds"], started=started, finished=now(),
            seconds=round(time.time() - start, 2), weights_sha256=sha256_file(weights_file),
        )
    if curve_path is not None:
        write_curve(curve_path, curve)
    checkpoints.clear()
    processes.wait()


def stage_main(phase: str, argv: list[str] | None = None) -> None:
    """Command line of stages/teacher.py and stages/baseline.py (FLOWOPD_PROCESSES=N: N processes)."""
    from flowopd.phases import check_stage_key
    from flowopd.spec import load_spec_or_exit

    if argv is None:
        relaunch_if_asked()

    parser = argparse.ArgumentParser(prog=f"stages/{phase}.py", description=f"run the {phase} phase of a spec")
    parser.add_argument("--spec", required=True, type=Path, help="spec YAML file")
    if phase == "teacher":
        parser.add_argument("--teacher", required=True, help="teacher name (a key of the spec's `teachers`)")
    parser.add_argument("--base", type=Path, help="base model artifact folder (tiny specs)")
    parser.add_argument("--data", required=True, type=Path, help="prompt sets folder (data phase)")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    parser.add_argument("--curve", type=Path, help="also write the training curve here (DVC plots)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    spec = load_spec_or_exit(args.spec)
    check_stage_key(spec, args.spec, phase, args.out, getattr(args, "teacher", None))
    if phase == "teacher":
        if args.teacher not in spec.teachers:
            raise SystemExit(f"unknown teacher {args.teacher!r}; the spec has {', '.join(spec.teachers)}")
        run_teacher(spec, args.teacher, args.base, args.data, args.out, args.curve, not args.no_progress)
    elif phase == "baseline":
        run_baseline(spec, args.base, args.data, args.out, args.curve, not args.no_progress)
    else:
        raise SystemExit(f"unknown phase {phase!r}")

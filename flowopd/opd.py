"""Stage 3: multi-teacher on-policy distillation with Manifold Anchor Regularisation (method.md section 4).

One OPD step k:
1. rollouts: the student samples P prompts x G with the SDE sampler (GRPO's rollout, same seeded streams), storing
   x_{s_0} ... x_{s_T} and log p_old(x_{t+1} | x_t); each sample's prompt was routed to ONE teacher beforehand;
2. targets, under no_grad, one forward per teacher per trained step over the rows routed to it: the teacher's step
   mean mu_T at the student's own x_t, same s, same condition, same CFG (and the anchor's mu_A when MAR is on);
3. per-step rewards of all trained steps (in nats, the whole step's log-density; see `step_rewards`):
       sampled   r_t = log N(x_{t+1}; mu_T, std^2) - log p_old(x_{t+1} | x_t)     E[r_t] = -KL, grad: -grad KL
       analytic  r_t = -KL(N(mu_old, std^2) || N(mu_T, std^2))                    constant in x_{t+1}
   A_t = r_t, or the reward-to-go sum_{t' >= t} r_t' over the trained steps, optionally standardised per step;
   credit "element" keeps each latent element's own log-ratio r_{t,d} as the advantage of that element's log-prob
   (per-token OPD with the elements as tokens): the same expected gradient without the other elements' noise;
4. loss over the trained steps (mean over samples, mean over steps), one clipped AdamW update per inner epoch:
       L_t = PPO-clip(A_t, ratio)                            sampled, analytic   (grpo.ppo_clip_loss)
       L_t = reduce_d PPO-clip(A_{t,d}, ratio_d)             the same, credit "element"
       L_t = KL(p_theta step || teacher step)                analytic_grad       (differentiable, GKD-style)
       L_t += lambda KL(p_theta step || anchor step)         MAR, differentiable (lambda = mar.weight)
5. every `ema.every` steps the EMA of the weights moves; the EMA is what the phase saves.
Samples routed to "base" are taught by the base model. KLs use the sampler's log-prob reduction (mean: per element).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowopd.artifacts import atomic_folder, canonical_hash, now, sha256_file, write_provenance
from flowopd.distributed import Processes, relaunch_if_asked
from flowopd.grpo import (
    ADV_EPS,
    TIMESTEP_STREAM,
    GRPOTrainer,
    lora_settings,
    ppo_clip_loss,
    train,
    trained_steps,
)
from flowopd.phases import opd_sub_spec  # the sub-spec the stage is keyed on (flowopd.pipeline)
from flowopd.sde import gaussian_log_prob, reduce_elements, sde_step_mean_std, step_kl
from flowopd.training import (
    ADAPTER,
    EMA,
    Checkpoints,
    checkpoint_folder,
    make_optimizer,
    prepare_policy,
    save_policy,
    step_log_prob,
    step_rng,
)

ESTIMATORS = ("sampled", "analytic", "analytic_grad")
CREDITS = ("step", "element")


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
    if estimator == "analytic_grad":
        raise ValueError("analytic_grad has no per-step reward: its KL is differentiated in the loss (step_loss)")
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


def step_loss(estimator: str, log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, mean_teacher: Tensor, std,
              advantages: Tensor | None, clip_eps: float, reduction: str = "mean", mean_anchor: Tensor | None = None,
              mar_weight: float = 0.0) -> tuple[Tensor, dict]:
    """Per-sample loss (B,) of one trained step and its terms {"policy", "ratio", "mar_kl"} (None when absent).

    sampled / analytic: PPO-clip with the advantages; analytic_grad: KL(N(mean, std^2) || N(mu_T, std^2));
    plus mar_weight * KL(N(mean, std^2) || N(mu_A, std^2)) when an anchor mean is given and the weight > 0.
    Per-element advantages (credit "element") take per-element log-probs (B, ...): each element's PPO-clip term,
    reduced over the elements by `reduction`.
    """
    if estimator == "analytic_grad":
        policy, ratio = step_kl(mean, mean_teacher, std, reduction), None
    elif estimator in ESTIMATORS:
        policy, ratio = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_eps)
        policy = reduce_elements(policy, reduction) if policy.ndim > 1 else policy
    else:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    loss, mar_kl = policy, None
    if mean_anchor is not None and mar_weight > 0:
        mar_kl = step_kl(mean, mean_anchor, std, reduction)
        loss = loss + mar_weight * mar_kl
    return loss, {"policy": policy, "ratio": ratio, "mar_kl": mar_kl}


def as_velocity(model):
    """A bundle (model.velocity(x, sigma, cond, cfg=...)) or a callable velocity(x, sigma, cond, cfg)."""
    if hasattr(model, "velocity"):
        return lambda x, sigma, cond, cfg: model.velocity(x, sigma, cond, cfg=cfg)
    if callable(model):
        return model
    raise TypeError(f"a teacher or anchor must be a bundle or a velocity callable, got {type(model).__name__}")


# ---------------------------------------------------------------- the trainer
class OPDTrainer:
    """Multi-teacher OPD on a bundle; `step(k)` runs rollout, teacher targets, update and EMA for step k.

    prompts: the training pool; routes[i]: the teacher of prompt i (a key of `teachers`, "base" included when
    used); teachers / anchor: bundles or velocity callables, frozen. anchor None or mar_weight 0: no MAR. When the
    anchor is one of the teacher objects, its rows reuse that teacher's forward. Driven by grpo.train(); the rollout
    and the checkpoint state are GRPOTrainer's own (same prompts, noise and timesteps per step). processes: this
    process's share of the batch (flowopd.distributed); rewards are gathered so advantages are the whole batch's.
    init_adapter: starting weights of the student's LoRA adapter (sd3: the cold start's merged adapter).
    """

    rollout = GRPOTrainer.rollout  # needs bundle, settings, prompts, prompt_tasks, seed
    state_dict = GRPOTrainer.state_dict  # needs named_params, optimizer, ema
    load_state_dict = GRPOTrainer.load_state_dict
    apply_ema = GRPOTrainer.apply_ema

    def __init__(self, bundle, settings, prompts, routes, teachers: dict, anchor=None, mar_weight: float = 0.0, *,
                 seed: int = 0, lora=None, init_adapter: dict | None = None, processes: Processes | None = None):
        sampler = settings.sampler
        self.processes = processes or Processes()
        self.processes.rows(settings.prompts_per_step * settings.group_size)  # refuses a batch that does not split
        if sampler.noise_level <= 0:
            raise ValueError("OPD needs the SDE sampler (sampler.noise_level > 0) for its log-probs")
        if sampler.steps < 2:
            raise ValueError("OPD needs sampler.steps >= 2 (the last step, to sigma 0, is never trained)")
        if settings.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {settings.estimator!r}")
        if len(routes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(routes)} routes")
        unknown = sorted(set(routes) - set(teachers))
        if unknown:
            raise ValueError(f"prompts routed to {unknown}, which no teacher model was given for "
                             f"(given: {', '.join(teachers) or 'none'})")
        self.bundle, self.settings, self.seed = bundle, settings, seed
        self.prompts = list(prompts)
        self.teacher_names = [name for name in teachers if name in set(routes)]  # curve columns, stable order
        self.prompt_tasks = np.array([self.teacher_names.index(r) for r in routes])  # rollout.tasks: teacher index
        self.teachers = {name: as_velocity(teachers[name]) for name in self.teacher_names}
        self.mar_weight = float(mar_weight)
        self.anchor = as_velocity(anchor) if anchor is not None and self.mar_weight > 0 else None
        self.anchor_alias = next((n for n in self.teacher_names if teachers[n] is anchor), None)
        torch.manual_seed(seed)  # LoRA's gaussian A
        self.named_params = prepare_policy(bundle, lora)
        if init_adapter is not None:
            bundle.load_adapter_state_dict(ADAPTER, init_adapter)
        self.params = list(self.named_params.values())
        self.optimizer = make_optimizer(self.params, settings.lr)
        self.ema = EMA(self.params, settings.ema.decay, settings.ema.every) if settings.ema else None

    # -- 2. frozen targets ------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, rollout, t: int, cfg: float) -> tuple[Tensor, Tensor | None, Tensor]:
        """(mu_T, mu_A or None, std) at trained step t: one forward per teacher over its rows, then the anchor."""
        traj, noise_level = rollout.trajectory, self.settings.sampler.noise_level
        x, sigma, sigma_next = traj.latents[t], traj.sigmas[t].item(), traj.sigmas[t + 1].item()
        device = x.device

        def means(velocity, rows):
            v = velocity(x[rows], sigma, rollout.cond.index(rows), cfg)
            return sde_step_mean_std(x[rows], v, sigma, sigma_next, noise_level)

        teacher_mean, std = torch.empty(x.shape, dtype=torch.float32, device=device), None
        for k, name in enumerate(self.teacher_names):
            rows = torch.as_tensor(np.flatnonzero(rollout.tasks == k), device=device)
            if len(rows):
                teacher_mean[rows], std_rows = means(self.teachers[name], rows)
                std = std_rows[:1].expand(x.shape[0], *std_rows.shape[1:])  # std depends on the step only
        anchor_mean = None
        if self.anchor is not None:
            anchor_mean = torch.empty_like(teacher_mean)
            shared = rollout.tasks == (self.teacher_names.index(self.anchor_alias) if self.anchor_alias else -1)
            if shared.any():
                rows = torch.as_tensor(np.flatnonzero(shared), device=device)
                anchor_mean[rows] = teacher_mean[rows]
            rows = torch.as_tensor(np.flatnonzero(~shared), device=device)
            if len(rows):
                anchor_mean[rows] = means(self.anchor, rows)[0]
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

    # -- 4. update --------------------------------------------------------------------------------------------
    def update(self, rollout, step: int) -> dict:
        s, sampler, traj = self.settings, self.settings.sampler, rollout.trajectory
        reduction = sampler.logprob_reduction
        cfg = sampler.cfg if s.cfg_train else 1.0
        common = {"cfg": cfg, "noise_level": sampler.noise_level, "reduction": reduction}
        steps = trained_steps(sampler.steps, s.timestep_fraction, step_rng(self.seed, TIMESTEP_STREAM, step))
        t0 = time.perf_counter()
        targets = {t: self.targets(rollout, t, cfg) for t in steps}
        advantages, processes = None, self.processes
        element = s.credit == "element" and s.estimator != "analytic_grad"  # per-element rewards and ratios
        if s.estimator != "analytic_grad":
            rewards = self.rewards(rollout, steps, targets, common)
            if processes.count > 1:  # (T, B, ...) of the whole batch: the per-step statistics are the batch's
                whole = processes.gather(rewards.movedim(1, 0).cpu().numpy())
                rewards = torch.as_tensor(whole, dtype=rewards.dtype, device=rewards.device).movedim(0, 1)
            advantages = step_advantages(rewards, s.reward_to_go, s.normalize_advantage)
            if processes.count > 1:
                advantages = advantages[:, processes.rows(advantages.shape[1])]
        t1 = time.perf_counter()
        stats, kl_by_teacher = defaultdict(list), defaultdict(list)
        self.bundle.transformer.train()
        for epoch in range(s.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for i, t in enumerate(steps):
                x, x_next = traj.latents[t], traj.latents[t + 1]
                sigma, sigma_next = traj.sigmas[t].item(), traj.sigmas[t + 1].item()
                mean_teacher, mean_anchor, _ = targets[t]
                log_prob, mean, std = step_log_prob(self.bundle, x, x_next, sigma, sigma_next, rollout.cond, **common)
                policy_log_prob, old_log_prob = log_prob, traj.log_probs[t]
                if element:  # each element's own ratio, against the rollout's step mean
                    policy_log_prob = gaussian_log_prob(x_next, mean, std, "none")
                    old_log_prob = gaussian_log_prob(x_next, traj.means[t], std, "none")
                per_sample, terms = step_loss(
                    s.estimator, policy_log_prob, old_log_prob, mean, mean_teacher, std,
                    None if advantages is None else advantages[i], s.clip_eps, reduction, mean_anchor, self.mar_weight)
                loss = per_sample.mean() / (len(steps) * processes.count)  # summed over processes
                loss.backward()
                stats["loss"].append(loss.item() * len(steps))
                stats["policy_loss"].append(terms["policy"].detach().mean().item())
                stats["approx_kl"].append((0.5 * (log_prob.detach() - traj.log_probs[t]) ** 2).mean().item())
                if terms["ratio"] is not None:
                    stats["clip_frac"].append(((terms["ratio"].detach() - 1).abs() > s.clip_eps).float().mean().item())
                if terms["mar_kl"] is not None:
                    stats["mar_kl"].append(terms["mar_kl"].detach().mean().item())
                if epoch == 0:  # KL to the routed teacher under the rollout policy
                    kl = step_kl(mean.detach(), mean_teacher, std, reduction)
                    stats["kl"].append(kl.mean().item())
                    for k, name in enumerate(self.teacher_names):
                        rows = torch.as_tensor(rollout.tasks == k, device=kl.device)
                        n = int(rows.sum())
                        kl_by_teacher[name].append(processes.pooled_mean(kl[rows].mean().item() if n else 0.0, n))
            processes.sum_gradients(self.params)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip or float("inf"))
            stats["grad_norm"].append(grad_norm.item())
            self.optimizer.step()
        self.bundle.transformer.eval()
        for key in sorted(stats):  # per-process means over equal shares (same keys everywhere)
            if key != "grad_norm":
                stats[key] = processes.mean(stats[key])
        row = {key: float(np.mean(values)) for key, values in stats.items()}
        if advantages is None:
            row["reward"] = -row["kl"]  # analytic_grad: the closed-form reward -KL it differentiates
        else:
            per_reward = traj.latents[0][0].numel() if element else 1  # elements per reward
            row["reward"] = rewards.mean().item() * per_reward / nats_per_unit(traj.latents[0], reduction)  # = -kl
        kl_by_teacher = {name: [v for v in values if not np.isnan(v)] for name, values in kl_by_teacher.items()}
        row |= {f"kl_{name}": float(np.mean(kl_by_teacher[name])) if kl_by_teacher[name] else None
                for name in self.teacher_names}
        row["teacher_s"] = t1 - t0
        return row

    # -- one whole step ---------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        rollout = self.rollout(step)
        t1 = time.perf_counter()
        stats = self.update(rollout, step)
        if self.ema is not None:
            self.ema.step(self.params, step)
        t2 = time.perf_counter()
        row = {"step": step, "reward": stats["reward"], "kl": stats["kl"]}
        row |= {f"kl_{name}": stats[f"kl_{name}"] for name in self.teacher_names}
        for key in ("mar_kl", "loss", "policy_loss", "clip_frac", "approx_kl", "grad_norm"):
            row[key] = stats.get(key)  # None (an empty cell): no MAR, or no PPO ratio (analytic_grad)
        row["kept_groups"] = None  # every sample trains (grpo.train shows the column)
        teacher_s = stats["teacher_s"]
        row |= {"rollout_s": round(t1 - t0, 4), "teacher_s": round(teacher_s, 4),
                "train_s": round(t2 - t1 - teacher_s, 4)}
        return row


# ---------------------------------------------------------------- the phase
def run_opd(spec, init_dir: Path, base_dir: Path | None, teacher_dirs: dict, data_dir: Path, out: Path,
            curve_path: Path | None = None, progress: bool = True) -> None:
    """OPD from the cold-start artifact `init_dir` on all tasks' train prompts; writes `out` atomically (the EMA
    student: a TinyBundle, or an sd3 adapter; curve.csv, provenance). Resumes from `<out>.ckpt` like the GRPO
    phases. sd3: student, teachers and anchor are adapters on ONE frozen base (sd3_models)."""
    from flowopd.cold_start import weights_sha
    from flowopd.phases import spec_identity, write_curve
    from flowopd.router import Router, format_summary, training_prompts

    started, start, out, settings = now(), time.time(), Path(out), spec.opd
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
    sub_spec = opd_sub_spec(spec)
    folders = {n: base_dir if n == "base" else teacher_dirs[n] for n in models if n != "base" or base_dir}
    inputs = {"init_sha256": weights_sha(init_dir), "teachers": {n: weights_sha(f) for n, f in folders.items()}}
    prompt_digest = hashlib.sha256("\n".join(f"{t}\t{p.text}" for p, t in zip(prompts, tasks)).encode()).hexdigest()
    fingerprint = canonical_hash({"sub_spec": sub_spec, "inputs": inputs, "prompts": prompt_digest})
    checkpoints = Checkpoints(checkpoint_folder(out), fingerprint)
    curve = train(trainer, settings.steps, checkpoints, settings.checkpoint_every, progress, desc=f"opd {out.name}")
    trainer.apply_ema()
    if not processes.is_main:  # the same weights everywhere; the main process writes them
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = save_policy(student, folder, lora)
        write_curve(folder / "curve.csv", curve)
        write_provenance(
            folder, "opd", sub_spec, **spec_identity(spec), curve=curve, estimator=settings.estimator, routing=counts,
            processes=processes.count,
            anchor=anchor_name, mar_weight=spec.mar.weight, init_dir=str(init_dir), init_sha256=inputs["init_sha256"],
            teachers={n: {"dir": str(f), "sha256": inputs["teachers"][n]} for n, f in folders.items()},
            lora=lora is not None, trainable_parameters=sum(p.numel() for p in trainer.params), steps=settings.steps,
            train_seconds=curve[-1]["seconds"], started=started, finished=now(),
            seconds=round(time.time() - start, 2), weights_sha256=sha256_file(weights_file),
        )
    if curve_path is not None:
        write_curve(curve_path, curve)
    checkpoints.clear()
    processes.wait()


def tiny_models(init_dir: Path, names: list[str], teacher_dirs: dict, base_dir: Path | None):
    """The student (the cold-start TinyBundle) and the named teachers ("base" included) as frozen TinyBundles."""
    from flowopd.cold_start import load_teachers
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
    from flowopd.cold_start import require_teacher_dirs
    from flowopd.grpo import load_bundle
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

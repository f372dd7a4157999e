"""On-policy rollouts and their rewards: what every trainer draws at step k (GRPO, OPD, the supervised-style ones).

A step's rollout: P prompts drawn from the training pool (stream PROMPT_STREAM), each sampled G times in a row with
the spec's sampler (SDE: x_{s_0} ... x_{s_T}, log-probs and step means; noise_level 0: the Euler ODE), its noise from
NOISE_STREAM. Everything derives from (seed, stream, k), so a resumed run draws step k alike, and over several
processes each one samples its contiguous share of the same global batch (flowopd.runtime.processes).

Rewards: reward k scores the samples whose prompt comes from task k; group advantages normalise them per prompt
(docs/method.md#teachers-flow-grpo):  A = (R - mean_group) / (std + 1e-4), std over the group or the whole step, clipped.
A reward that waits on a server (`reward: remote`) scores each decoded chunk (`decode_batch`) on a small thread pool
while the rollout decodes the next chunks and the in-process rewards score (RemoteScoring); the scores are collected
into their rows before the advantages. In-process rewards score on the caller's thread, as before.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from flowopd.flow.sampler import Trajectory, sample
from flowopd.models.bundle import Condition, micro_batched_decode, micro_batched_scores, micro_batches
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import tally
from flowopd.train.streams import NOISE_STREAM, PROMPT_STREAM, step_generator, step_rng

ADV_EPS = 1e-4
SCORING_THREADS = 4  # requests to reward servers in flight at once while a rollout decodes


@dataclass
class Rollout:
    """One step's samples: each chosen prompt G times in a row (this process's rows of them)."""

    prompts: list  # (N,) flowopd.world.Prompt
    tasks: np.ndarray  # (N,) index of the reward (GRPO) or the teacher (OPD) of each sample
    cond: Condition  # (N, ...)
    trajectory: Trajectory  # latents (T+1, N, ...); log_probs (T, N) and means under the rollout policy (SDE)
    images: np.ndarray | None  # (N, H, W, 3) uint8, None when not decoded
    pending: list[Future] = field(default_factory=list)  # remote scores of decoded chunks (RemoteScoring)


def step_prompts(n_prompts: int, prompts_per_step: int, group_size: int, seed: int, step: int,
                 processes: Processes) -> tuple[np.ndarray, slice, slice]:
    """Step `step`'s draw from a pool of n_prompts: the P chosen prompts (pool indices), this process's rows of the
    P x G samples, and the span of the chosen prompts those rows sample."""
    rng = step_rng(seed, PROMPT_STREAM, step)
    chosen = rng.choice(n_prompts, size=prompts_per_step, replace=prompts_per_step > n_prompts)
    rows = processes.rows(prompts_per_step * group_size)
    return chosen, rows, slice(rows.start // group_size, -(-rows.stop // group_size))


def rollout_texts(prompts: list, prompts_per_step: int, group_size: int, steps: int, seed: int,
                  processes: Processes) -> list[str]:
    """Every prompt text this process's rollouts of steps 0 .. steps - 1 encode, once each: what a bundle that
    caches embeddings embeds before its text encoders go (flowopd.models.bundle.embed_and_release)."""
    texts = {}
    for step in range(steps):
        chosen, _, mine = step_prompts(len(prompts), prompts_per_step, group_size, seed, step, processes)
        texts.update(dict.fromkeys(prompts[i].text for i in chosen[mine]))
    return list(texts)


def draw_rollout(bundle, prompts: list, prompt_tasks: np.ndarray, sampler, prompts_per_step: int, group_size: int,
                 seed: int, step: int, processes: Processes, decode: bool = True, transformer=None,
                 micro_batch: int | None = None, decode_batch: int | None = None, on_decoded=None) -> Rollout:
    """Step `step`'s rollout of `bundle` (no grad, eval mode); `decode`: also the images the rewards score;
    `transformer`: sample another copy of the transformer than the bundle's (NFT's sampling policy).
    micro_batch / decode_batch: samples per transformer forward / per VAE decode (None: this process's share).
    on_decoded(rows, images, prompts, tasks) -> futures: called with each decoded chunk (RemoteScoring.submit)."""
    chosen, rows, mine = step_prompts(len(prompts), prompts_per_step, group_size, seed, step, processes)
    cond = bundle.encode([prompts[i].text for i in chosen[mine]]).repeat_interleave(group_size)  # this process's
    if processes.count > 1:
        first = mine.start * group_size
        cond = cond.index(slice(rows.start - first, rows.stop - first))
    bundle.transformer.eval()
    x, trajectory = sample(
        bundle, cond, steps=sampler.steps, shift=sampler.shift, cfg=sampler.cfg, noise_level=sampler.noise_level,
        generator=step_generator(seed, NOISE_STREAM, step), return_trajectory=True,
        log_prob_reduction=sampler.logprob_reduction, share=(processes.index, processes.count),
        transformer=transformer, sde=sampler.sde, window=sampler.sde_window, micro_batch=micro_batch,
    )
    tally("images", len(x))  # this process's rows of the step's samples (the training budget)
    samples = [prompts[i] for i in chosen for _ in range(group_size)][rows]
    tasks = np.repeat(np.asarray(prompt_tasks)[chosen], group_size)[rows]
    if not decode or on_decoded is None:
        images = micro_batched_decode(bundle, x, decode_batch) if decode else None
        return Rollout(samples, tasks, cond, trajectory, images)
    chunks, pending = [], []
    for part in micro_batches(len(x), decode_batch):  # each chunk's scoring starts before the next is decoded
        chunks.append(micro_batched_decode(bundle, x[part]))
        pending += on_decoded(part, chunks[-1], samples[part], tasks[part])
    return Rollout(samples, tasks, cond, trajectory, np.concatenate(chunks), pending)


def trained_steps(sampler_steps: int, fraction: float, rng: np.random.Generator, stochastic=None) -> list[int]:
    """Which steps a rollout trains: the stochastic ones (default all) but the last one (to sigma 0), or a random
    share of them (sorted). stochastic: (steps,) bool, Trajectory.stochastic (an SDE window, CPS's last step)."""
    candidates = [t for t in range(sampler_steps - 1) if stochastic is None or bool(stochastic[t])]
    if not candidates:
        raise ValueError("the sampler has no stochastic step to train (sde_window, or noise_level 0)")
    n = max(1, min(len(candidates), round(fraction * len(candidates))))
    if n == len(candidates):
        return candidates
    return sorted(candidates[i] for i in rng.choice(len(candidates), size=n, replace=False).tolist())


# ---------------------------------------------------------------- rewards of a rollout
def score_matrix(images: np.ndarray, prompts: list, tasks: np.ndarray, rewards: list,
                 batch: int | None = None) -> np.ndarray:
    """(N, K) scores: reward k scores the samples whose prompt comes from task k; NaN elsewhere (and in the column
    of a reward given as None: RemoteScoring fills it). batch: images per reward call (None: each task's at once)."""
    scores = np.full((len(prompts), len(rewards)), np.nan)
    for k, reward in enumerate(rewards):
        rows = np.flatnonzero(tasks == k)
        if len(rows) and reward is not None:
            scores[rows, k] = micro_batched_scores(reward, images[rows], [prompts[i] for i in rows], batch)["score"]
    return scores


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


def waits_on_network(reward) -> bool:
    """A reward whose calls wait on a server (flowopd.rewards.RemoteReward): worth running on a thread."""
    return bool(getattr(reward, "waits_on_network", False))


class RemoteScoring:
    """Scores a rollout's decoded chunks with the rewards that wait on a server, on a small thread pool, so network
    time hides behind decoding the next chunks and the in-process rewards; collect() puts each chunk's scores into
    its rows, so the order never depends on which answer comes first. The trainers ask for "score" alone (a server
    may skip the rest: GenEval's only_strict behind reward-server)."""

    def __init__(self, rewards: list, batch: int | None):
        self.rewards = {k: reward for k, reward in enumerate(rewards) if waits_on_network(reward)}
        self.batch = batch
        self.pool = ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="reward-scoring")

    def submit(self, part: slice, images: np.ndarray, prompts: list, tasks: np.ndarray) -> list[Future]:
        """Futures of (rows, k, scores) for one chunk: `part` its rows in the rollout, one future per reward."""
        futures = []
        for k, reward in self.rewards.items():
            mine = np.flatnonzero(tasks == k)
            if len(mine):
                futures.append(self.pool.submit(self.score_rows, reward, k, part.start + mine, images[mine],
                                                [prompts[i] for i in mine]))
        return futures

    def score_rows(self, reward, k: int, rows: np.ndarray, images: np.ndarray, prompts: list):
        scored = micro_batched_scores(functools.partial(reward, metrics=("score",)), images, prompts, self.batch)
        return rows, k, scored["score"]

    @staticmethod
    def collect(futures: list[Future], scores: np.ndarray) -> None:
        """Wait for every chunk's scores and write them into `scores` (N, K); the first failure is raised once the
        chunks not yet started are cancelled."""
        try:
            for future in futures:
                rows, k, values = future.result()
                scores[rows, k] = values
        finally:
            for future in futures:
                future.cancel()


class RewardRollouts:
    """What a reward-trained policy (GRPO, NFT) does around its update: roll out, score, normalise, then
    `update(rollout, advantages, kept, step) -> stats` (the subclass's) and the curve row. Needs bundle, settings
    (sampler, prompts_per_step, group_size, adv_std, adv_clip), prompts, prompt_tasks, rewards, reward_names,
    weights, advantage, seed, processes."""

    curve_keys: tuple[str, ...] = ("loss", "grad_norm")
    """The update's stats written to the curve (None, an empty cell, where a step trained nothing)."""

    def rollout(self, step: int) -> Rollout:
        s = self.settings
        remote = self.remote_scoring
        return draw_rollout(self.bundle, self.prompts, self.prompt_tasks, s.sampler, s.prompts_per_step,
                            s.group_size, self.seed, step, self.processes, transformer=self.sampling_transformer(),
                            micro_batch=s.micro_batch, decode_batch=s.decode_batch,
                            on_decoded=remote.submit if remote is not None else None)

    @functools.cached_property
    def remote_scoring(self) -> RemoteScoring | None:
        """Threads for the rewards that wait on a server; None when every reward runs in process."""
        if not any(waits_on_network(reward) for reward in self.rewards):
            return None
        return RemoteScoring(self.rewards, self.settings.reward_batch)

    def sampling_transformer(self):
        """The transformer the rollouts sample (None: the bundle's own, the policy being trained)."""
        return None

    def score(self, rollout: Rollout) -> np.ndarray:
        """(N, K) scores of the whole batch: each process scores its own rows, then they are gathered. The in-process
        rewards score here while the remote ones' chunks (submitted as they were decoded) finish on their threads."""
        remote = self.remote_scoring
        in_process = self.rewards if remote is None else [None if k in remote.rewards else reward
                                                          for k, reward in enumerate(self.rewards)]
        scores = score_matrix(rollout.images, rollout.prompts, rollout.tasks, in_process, self.settings.reward_batch)
        if remote is not None:
            remote.collect(rollout.pending, scores)
        return self.processes.gather(scores)

    def advantages(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        return mixed_advantages(scores, self.weights, s.group_size, self.advantage, s.adv_std, s.adv_clip)

    def reward_columns(self, scores: np.ndarray, kept: np.ndarray) -> dict:
        """The curve's reward columns: the weighted total, each reward's mean over the samples it scored, and the
        share of groups with any reward spread."""
        row = {"reward": float(np.nansum(scores * self.weights, axis=1).mean())}
        for k, name in enumerate(self.reward_names):
            column = scores[:, k]
            row[f"reward_{name}"] = float(np.nanmean(column)) if (~np.isnan(column)).any() else None
        row["kept_groups"] = float(kept.reshape(-1, self.settings.group_size)[:, 0].mean())
        return row

    def summed_stats(self, stats: dict) -> dict:
        """Each stat's mean over its entries, with every entry but grad_norm (already global) summed over processes:
        each process's weighted sums add up to the batch's (the same keys on every process)."""
        for key in sorted(stats):
            if key != "grad_norm":
                stats[key] = self.processes.sum(stats[key])
        return {key: float(np.mean(values)) for key, values in stats.items()}

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        rollout = self.rollout(step)
        t1 = time.perf_counter()
        scores = self.score(rollout)
        advantages, kept = self.advantages(scores)
        t2 = time.perf_counter()
        stats = self.update(rollout, advantages, kept, step)
        t3 = time.perf_counter()
        row = {"step": step} | self.reward_columns(scores, kept) | {key: stats.get(key) for key in self.curve_keys}
        return row | {"rollout_s": round(t1 - t0, 4), "reward_s": round(t2 - t1, 4), "train_s": round(t3 - t2, 4)}

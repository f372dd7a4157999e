"""The SFT cold start: the routed teachers' samples, then the base fine-tuned on them by plain flow matching.

Each teacher samples `samples_per_prompt` images for the train prompts routed to it (the cold start's own sampler),
optionally only each prompt's best-reward sample is kept, then the base is fine-tuned on them with the flow-matching
loss  L = || v_theta(x_s, s, c) - (e - x0) ||^2,  x_s = (1 - s) x0 + s e  (docs/method.md#cold-start).
The targets come from the evaluation's sampler (its deterministic ODE, as in Flow-GRPO-style SFT on teacher images)
unless `cold_start.target_sampler: rollout` picks the cold start's own `sampler`. Memory: the prompts are embedded
once (sd3: then the text encoders are freed), the samples stay on the host and each chunk or batch goes to the
device as it is used; the scoring decodes and scores a chunk at a time.
Several processes (accelerate launch) split it like the trainers (flowopd.runtime.processes): each sampling chunk's
rows (every draw made for the whole chunk), the scoring, and each SFT batch's rows (every draw made for the whole
batch, gradients summed), so they reach the 1-process weights up to float summation order.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from flowopd.flow.sampler import sample
from flowopd.methods.router import Router, format_summary
from flowopd.models.bundle import (
    Condition,
    embed_and_release,
    micro_batched_decode,
    micro_batched_encode,
    micro_batches,
)
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import tally
from flowopd.train.losses import flow_matching_draws, flow_matching_loss
from flowopd.train.policy import enable_gradient_checkpointing, make_optimizer, prepare_policy
from flowopd.train.streams import SFT_SAMPLE_STREAM, SFT_TRAIN_STREAM, step_generator

SAMPLE_BATCH = 64  # rows per sampling call (fixed: the noise drawn depends on it)


@torch.no_grad()
def teacher_samples(teachers: dict, prompts: list, routes: list[str], sampler, samples_per_prompt: int, seed: int,
                    progress: bool = True, processes: Processes | None = None, micro_batch: int | None = None) -> Tensor:
    """x0 (N * G, ...): G = samples_per_prompt samples of prompt i in rows i G ... i G + G - 1, each drawn by the
    teacher prompt i is routed to (teachers: name -> bundle). Each teacher draws from its own stream, keyed by its
    name, so its samples do not depend on the other teachers. Several processes split each chunk of rows evenly
    (a chunk that does not split is sampled whole by each) and gather them: every process returns all of x0, on the
    host (CPU). micro_batch: rows per transformer forward and prompts per text-encoder call (None: a chunk's share).
    """
    processes = processes or Processes()
    missing = sorted(set(routes) - set(teachers))
    if missing:
        raise ValueError(f"prompts are routed to {missing} but no such teacher model was given")
    group = samples_per_prompt
    out = None
    total = len(prompts) * group
    bar = tqdm(total=total, desc="teacher samples", unit="img", disable=not progress or not processes.is_main,
               dynamic_ncols=True)
    for name in sorted(teachers):
        mine = [i for i, route in enumerate(routes) if route == name]
        if not mine:
            continue
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        bundle, generator = teachers[name], step_generator(seed, SFT_SAMPLE_STREAM, key)
        rows = [i * group + j for i in mine for j in range(group)]
        for start in range(0, len(rows), SAMPLE_BATCH):
            chunk = rows[start : start + SAMPLE_BATCH]
            share = (processes.index, processes.count) if len(chunk) % processes.count == 0 else (0, 1)
            part = chunk[processes.rows(len(chunk))] if share[1] > 1 else chunk
            cond = micro_batched_encode(bundle, [prompts[r // group].text for r in part], micro_batch)
            x = sample(bundle, cond, steps=sampler.steps, shift=sampler.shift, cfg=sampler.cfg,
                       noise_level=sampler.noise_level, generator=generator,
                       log_prob_reduction=sampler.logprob_reduction, share=share, sde=sampler.sde,
                       window=sampler.sde_window, micro_batch=micro_batch).cpu()
            if share[1] > 1:
                x = torch.cat(processes.gather_objects(x))
            tally("images", len(part) if share[1] > 1 else len(chunk) if processes.is_main else 0)  # each image once
            if out is None:
                out = torch.empty((total, *x.shape[1:]), dtype=x.dtype)
            out[torch.as_tensor(chunk)] = x
            bar.update(len(chunk))
    bar.close()
    return out


def best_of_groups(scores, group: int) -> np.ndarray:
    """Row index of each consecutive group's best score (the first on ties)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, group)
    return np.arange(len(scores)) * group + scores.argmax(axis=1)


def fitting_parts(batch_size: int, processes: Processes, micro_batch: int | None) -> list[slice | None]:
    """This process's rows of an SFT batch in micro-batches of at most `micro_batch`; [None]: the whole batch in
    one forward (one process, no micro-batches)."""
    share = processes.rows(batch_size) if processes.count > 1 else slice(0, batch_size)
    parts = micro_batches(share.stop - share.start, micro_batch)
    if processes.count == 1 and len(parts) == 1:
        return [None]
    return [slice(share.start + part.start, share.start + part.stop) for part in parts]


def sft(bundle, x0: Tensor, texts: list[str], settings, seed: int, cfg_dropout: float = 0.0,
        time_sampling: str = "logit_normal", progress: bool = True, processes: Processes | None = None) -> list[dict]:
    """Fine-tune the bundle's transformer (or a LoRA adapter, settings.lora) on (x0, text) pairs with the
    flow-matching loss for settings.steps batches of settings.batch_size; a share `cfg_dropout` of each batch sees
    the empty prompt (keeps classifier-free guidance working). The text encoder stays frozen; each batch's prompts
    are encoded as it is drawn (sd3: from the embeddings cache). x0 may live on the host. Returns the curve.
    Several processes: each takes its rows of every batch (batch_size a multiple of the count), gradients summed;
    settings.micro_batch splits a process's rows further (the draws stay the whole batch's, gradients accumulate).
    """
    processes = processes or Processes()
    torch.manual_seed(seed)  # LoRA's gaussian A
    params = list(prepare_policy(bundle, settings.lora).values())
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(bundle.transformer)
    optimizer = make_optimizer(params, settings.lr)
    generator = step_generator(seed, SFT_TRAIN_STREAM, 0)
    device, null = bundle.transformer.device, bundle.encode([""])
    curve, start = [], time.perf_counter()
    bundle.transformer.train()
    bar = tqdm(range(settings.steps), desc="sft", disable=not progress or not processes.is_main, dynamic_ncols=True)
    if settings.batch_size % processes.count:
        raise SystemExit(f"cold_start.batch_size {settings.batch_size} does not split over {processes.count} "
                         "processes: make it a multiple of the process count")
    parts = fitting_parts(settings.batch_size, processes, settings.micro_batch)
    for step in bar:
        idx = torch.randint(len(texts), (settings.batch_size,), generator=generator)
        drop = (torch.rand(settings.batch_size, generator=generator) < cfg_dropout).to(device)
        picked = micro_batched_encode(bundle, [texts[i] for i in idx.tolist()], settings.micro_batch)
        cond = Condition(
            torch.where(drop[:, None, None], null.prompt_embeds, picked.prompt_embeds),
            torch.where(drop[:, None], null.pooled, picked.pooled),
        )
        batch = x0[idx].to(device)  # x0 stays on the host; a batch goes to the device as it is used
        noise, sigma = flow_matching_draws(batch, generator, time_sampling)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows in parts:  # one forward and backward each: the gradients accumulate
            loss = flow_matching_loss(bundle, batch, cond, noise, sigma, rows)
            loss.backward()
            total += loss.item()
        processes.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        tally("optimizer_steps", int(processes.is_main))  # one step of the model, however many processes took it
        value = processes.sum([total])[0]  # the whole batch's loss
        curve.append({"step": step, "loss": value, "seconds": round(time.perf_counter() - start, 3)})
        bar.set_postfix(loss=f"{value:.4f}")
    bundle.transformer.eval()
    return curve


def sample_scores(spec, base, x0: Tensor, prompts: list, tasks: list[str], processes: Processes) -> np.ndarray:
    """Each sample's score under the reward of its prompt's task of origin, gathered. Each process decodes and
    scores its rows reward_batch at a time (decode_batch images per VAE decode), so it holds one chunk's images."""
    from flowopd.rewards import task_reward
    from flowopd.world.prompt_sets import world_config

    settings, rewards = spec.cold_start, {}
    group = settings.samples_per_prompt
    share = processes.split(len(x0))
    scores = np.empty(share.stop - share.start)
    for part in micro_batches(len(scores), settings.reward_batch):
        rows = np.arange(share.start + part.start, share.start + part.stop)
        images = micro_batched_decode(base, x0[rows[0] : rows[-1] + 1], settings.decode_batch)
        for task in dict.fromkeys(tasks):
            mine = np.flatnonzero([tasks[r // group] == task for r in rows])
            if len(mine):
                if task not in rewards:  # built on first use: a process may score no sample of a task
                    rewards[task] = task_reward(spec.tasks[task], world_config(spec))
                batch_prompts = [prompts[r // group] for r in rows[mine]]
                scores[part.start + mine] = rewards[task](images[mine], batch_prompts)["score"]
    return np.concatenate(processes.gather_objects(scores))


def target_sampler(spec):
    """The sampler of the SFT targets: the evaluation's (`cold_start.target_sampler: evaluation`, its ODE) or the
    cold start's own `sampler` (`rollout`)."""
    settings = spec.cold_start
    return spec.evaluation.sampler if settings.target_sampler == "evaluation" else settings.sampler


def sft_cold_start(spec, base, teachers: dict, prompts: list, tasks: list[str], progress: bool = True,
                   processes: Processes | None = None):
    """Route the prompts, sample the teachers, keep the best of each group (optional), fine-tune `base` in place.

    best_of_group scores each sample with the reward of its prompt's task of origin (with task routing, the routed
    teacher's task; rewards read the prompt's structured fields, so another task's reward would not apply).
    -> (curve, info for the provenance).
    """
    settings, processes = spec.cold_start, processes or Processes()
    router = Router.from_spec(spec)
    routes = router.route_all(prompts, tasks)
    counts = router.summary(prompts, tasks)
    if processes.is_main:
        print(format_summary(counts))
    group = settings.samples_per_prompt
    embed_and_release(base, [p.text for p in prompts], settings.micro_batch)  # sd3: the teachers are its adapters
    x0 = teacher_samples(teachers, prompts, routes, target_sampler(spec), group, spec.seed, progress, processes,
                         settings.micro_batch)
    rows = np.arange(len(x0))
    if settings.best_of_group and group > 1:
        rows = best_of_groups(sample_scores(spec, base, x0, prompts, tasks, processes), group)
        x0 = x0[torch.as_tensor(rows)]  # the kept samples; the others are freed
    texts = [prompts[r // group].text for r in rows]
    tiny = spec.model.kind == "tiny"
    curve = sft(base, x0, texts, settings, spec.seed, cfg_dropout=spec.base.cfg_dropout if tiny else 0.0,
                time_sampling=spec.base.time_sampling if tiny else "logit_normal", progress=progress,
                processes=processes)
    return curve, {"routing": counts, "samples": len(rows)}

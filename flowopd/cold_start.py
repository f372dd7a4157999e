"""Stage 2: the student's starting point (method.md section 3): merge of the teachers, SFT on their samples, or none.

merge (per tensor, tau_k = theta_k - base, weights w_k):
    linear           theta = sum_k w_k theta_k / sum_k w_k
    task_arithmetic  theta = base + scale * sum_k w_k tau_k                       (Ilharco et al. 2023)
    ties             theta = base + scale * disjoint_mean_k(trim(tau_k))          (TIES, Yadav et al. 2023)
LoRA teachers (adapters A: (r, in), B: (out, r), delta W = (alpha / r) B A): `product` merges the deltas B A by the
rule above (with base 0); `factors` merges the A's and the B's separately (the reference code), and since
mean(B) mean(A) != mean(B A) the two differ. Both return the full-weight delta to fold into the base.

sft: each teacher samples `samples_per_prompt` images for the train prompts routed to it (the cold start's own
sampler), optionally only each prompt's best-reward sample is kept, then a copy of the base is fine-tuned on them
with the plain flow-matching loss  L = || v_theta(x_s, s, c) - (e - x0) ||^2,  x_s = (1 - s) x0 + s e.
Several processes (accelerate launch) split it like the trainers (flowopd.distributed): each sampling chunk's rows
(every draw made for the whole chunk), the scoring, and each SFT batch's rows (every draw made for the whole batch,
gradients summed), so they reach the 1-process weights up to float summation order.
none: the student is the base.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from flowopd.artifacts import atomic_folder, canonical_hash, now, sha256_file, write_provenance
from flowopd.distributed import Processes
from flowopd.models.base import Condition
from flowopd.models.loading import load_bundle, load_teachers, require_teacher_dirs, weights_sha
from flowopd.phases import cold_start_sub_spec  # the sub-spec the stage is keyed on (flowopd.pipeline)
from flowopd.router import Router, format_summary, training_prompts
from flowopd.sampling import sample
from flowopd.training import ADAPTER, make_optimizer, prepare_policy, save_policy, step_generator

MERGE_MODES = ("linear", "task_arithmetic", "ties")
SAMPLE_STREAM, TRAIN_STREAM = 11, 12  # random streams of the SFT cold start (GRPO's are 1-3)
SAMPLE_BATCH = 64  # rows per sampling call (fixed: the noise drawn depends on it)


# ---------------------------------------------------------------- merging state dicts
def ties_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the top `density` share of entries by magnitude (at least one), zero the rest."""
    n = tau.numel()
    k = max(1, round(density * n))
    if k >= n:
        return tau.clone()
    flat = tau.flatten()
    keep = flat.abs().topk(k).indices
    trimmed = torch.zeros_like(flat)
    trimmed[keep] = flat[keep]
    return trimmed.view_as(tau)


def ties_merge(taus: list[Tensor], weights: Tensor, density: float) -> Tensor:
    """TIES on task vectors: trim each, elect gamma = sign(sum_k w_k trim(tau_k)) per entry, then the disjoint mean
    sum_k w_k tau_k [sign(tau_k) = gamma] / sum_k w_k [sign(tau_k) = gamma] (0 where no task vector agrees)."""
    trimmed = torch.stack([ties_trim(tau, density) for tau in taus])
    w = weights.reshape(-1, *[1] * (trimmed.ndim - 1)).to(trimmed)
    gamma = torch.sign((w * trimmed).sum(0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    numerator = (w * trimmed * agree).sum(0)
    denominator = (w * agree).sum(0)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))


def merge_states(base: dict | None, teachers: list[dict], weights, mode: str = "linear", density: float = 0.2,
                 scale: float = 1.0) -> dict[str, Tensor]:
    """Merge teacher state dicts (all with the same keys and shapes) by `mode`; see the module docstring.

    linear ignores `base` (may be None) and takes no `scale`; weights need not sum to 1 (linear normalises them,
    task arithmetic uses them as given, TIES only through their ratios). Non-float tensors must agree.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    if not teachers or len(teachers) != len(weights):
        raise ValueError(f"{len(teachers)} teachers but {len(weights)} weights")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"merge weights must be >= 0 with a positive sum, got {w.tolist()}")
    if mode == "linear" and scale != 1.0:
        raise ValueError("scale applies to task_arithmetic and ties; linear averages the weights (scale must be 1)")
    if mode != "linear" and base is None:
        raise ValueError(f"{mode} merges task vectors theta_k - base: pass the base state dict")
    keys = list(teachers[0])
    for i, state in enumerate(teachers[1:], 1):
        if set(state) != set(keys):
            raise ValueError(f"teacher {i} has other keys than teacher 0: {sorted(set(state) ^ set(keys))[:5]}")
    if base is not None and set(base) != set(keys):
        raise ValueError(f"the base has other keys than the teachers: {sorted(set(base) ^ set(keys))[:5]}")
    merged = {}
    for key in keys:
        tensors = [state[key] for state in teachers]
        if any(t.shape != tensors[0].shape for t in tensors) or (base is not None and base[key].shape != tensors[0].shape):
            raise ValueError(f"{key}: shapes differ between the models")
        same = all(torch.equal(t, tensors[0]) for t in tensors[1:])
        if not tensors[0].is_floating_point() and not same:
            raise ValueError(f"{key}: non-float tensors differ between the teachers")
        if not tensors[0].is_floating_point() or same and (mode == "linear" or torch.equal(tensors[0], base[key])):
            merged[key] = tensors[0].clone()  # frozen parts (e.g. the text encoder) stay bit-exact
            continue
        stacked = torch.stack([t.double() for t in tensors])
        if mode == "linear":
            value = torch.einsum("k,k...->...", w / w.sum(), stacked)
        else:
            taus = stacked - base[key].double()
            if mode == "task_arithmetic":
                delta = torch.einsum("k,k...->...", w, taus)
            else:
                delta = ties_merge(list(taus), w, density)
            value = base[key].double() + scale * delta
        merged[key] = value.to(tensors[0].dtype)
    return merged


# ---------------------------------------------------------------- LoRA adapters
def lora_factors(adapter: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """peft adapter state dict -> {module: (A, B)}; keys `<module>.lora_A[.<name>].weight` and `..lora_B..`."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in adapter.items():
        for factor in ("A", "B"):
            marker = f".lora_{factor}."
            if marker in key:
                pairs.setdefault(key.split(marker)[0], {})[factor] = value
                break
        else:
            raise ValueError(f"{key}: not a LoRA factor (lora_A / lora_B); only plain LoRA adapters merge")
    incomplete = [m for m, p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"modules without both lora_A and lora_B: {incomplete[:5]}")
    return {module: (p["A"], p["B"]) for module, p in pairs.items()}


def lora_delta(adapter: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """{<module>.weight: scaling * B @ A}, the full-weight change the adapter makes (scaling = alpha / rank)."""
    return {f"{module}.weight": (scaling * (b.double() @ a.double())).to(a.dtype)
            for module, (a, b) in lora_factors(adapter).items()}


def merge_lora(adapters: list[dict], weights, mode: str = "linear", density: float = 0.2, scale: float = 1.0,
               lora_merge: str = "product", scaling=1.0) -> dict[str, Tensor]:
    """Merge LoRA teachers into one full-weight delta {<module>.weight: dW} to add to the base weights.

    product: dW = merge_k((alpha_k / r_k) B_k A_k), the rule applied to each teacher's delta (base delta 0);
    factors: dW = (alpha / r) merge_k(B_k) merge_k(A_k) (the reference code; needs one alpha / r for all).
    `scaling`: alpha / rank, one float or one per adapter.
    """
    scalings = [float(s) for s in scaling] if isinstance(scaling, (list, tuple)) else [float(scaling)] * len(adapters)
    if len(scalings) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(scalings)} scalings")
    if lora_merge == "product":
        deltas = [lora_delta(a, s) for a, s in zip(adapters, scalings)]
        zero = None if mode == "linear" else {k: torch.zeros_like(v) for k, v in deltas[0].items()}
        return merge_states(zero, deltas, weights, mode, density, scale)
    if lora_merge == "factors":
        if len(set(scalings)) != 1:
            raise ValueError(f"merging factors needs one alpha / rank for all adapters, got {scalings}")
        zero = None if mode == "linear" else {k: torch.zeros_like(v) for k, v in adapters[0].items()}
        return lora_delta(merge_states(zero, adapters, weights, mode, density, scale), scalings[0])
    raise ValueError(f"lora_merge must be 'product' or 'factors', got {lora_merge!r}")


def merged_adapter(adapters: list[dict], configs: list[dict], weights, mode: str = "linear", density: float = 0.2,
                   scale: float = 1.0, lora_merge: str = "product") -> tuple[dict[str, Tensor], dict]:
    """The LoRA teachers merged into ONE adapter, for a student on the shared frozen sd3 base. -> (state, config)

    product, linear / task_arithmetic: exact, by concatenation: A = [A_1; ...; A_K], B = [c_1 B_1 | ... | c_K B_K],
    c_k = (w_k / sum w, or scale w_k) alpha_k / r_k, and alpha = rank = sum r_k, so B A = merge_k((alpha_k / r_k)
    B_k A_k) as merge_lora computes it; the student then trains an adapter of rank sum r_k.
    factors: the A's and the B's merged separately by any mode (the reference code), rank r, the teachers' alpha.
    product with ties merges full deltas element-wise, which no low-rank adapter holds: refused.
    """
    w = [float(x) for x in weights]
    targets = {tuple(sorted(c["target_modules"])) for c in configs}
    if len(targets) != 1:
        raise ValueError(f"the teachers' adapters target different modules: {sorted(targets)}")
    if lora_merge == "factors":
        if len({c["alpha"] / c["rank"] for c in configs}) != 1 or len({c["rank"] for c in configs}) != 1:
            raise ValueError("merging factors needs one rank and alpha for all adapters")
        zero = None if mode == "linear" else {k: torch.zeros_like(v) for k, v in adapters[0].items()}
        return merge_states(zero, adapters, w, mode, density, scale), dict(configs[0], dropout=0.0)
    if lora_merge != "product":
        raise ValueError(f"lora_merge must be 'product' or 'factors', got {lora_merge!r}")
    if mode == "ties":
        raise ValueError("a TIES merge of LoRA products is not low-rank, so no adapter holds it; for an sd3 student "
                         "use mode linear or task_arithmetic, or lora_merge: factors")
    if min(w) < 0 or sum(w) <= 0 or (mode == "linear" and scale != 1.0):
        raise ValueError(f"merge weights must be >= 0 with a positive sum (got {w}) and linear takes no scale")
    coefficients = [x / sum(w) for x in w] if mode == "linear" else [scale * x for x in w]
    factors = [lora_factors(a) for a in adapters]
    state = {}
    for module in factors[0]:
        a_k, b_k = zip(*(f[module] for f in factors), strict=True)
        state[f"{module}.lora_A.weight"] = torch.cat(a_k, dim=0)
        state[f"{module}.lora_B.weight"] = torch.cat(
            [c * cfg["alpha"] / cfg["rank"] * b for c, cfg, b in zip(coefficients, configs, b_k, strict=True)], dim=1)
    rank = sum(c["rank"] for c in configs)
    return state, dict(configs[0], rank=rank, alpha=float(rank), dropout=0.0)


def fold_delta(base: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
    """base + delta on the delta's keys (a merged LoRA delta into full weights)."""
    missing = [k for k in delta if k not in base]
    if missing:
        raise ValueError(f"delta keys not in the base: {missing[:5]}")
    return {k: (v + delta[k].to(v)) if k in delta else v.clone() for k, v in base.items()}


# ---------------------------------------------------------------- SFT on teacher samples
def flow_matching_loss(bundle, x0: Tensor, cond: Condition, generator: torch.Generator,
                       time_sampling: str = "logit_normal", rows: slice | None = None) -> Tensor:
    """|| v_theta(x_s, s, c) - (e - x0) ||^2 averaged, x_s = (1 - s) x0 + s e, s ~ logit-normal(0, 1) or uniform
    (the base's pretraining loss, flowopd.pretrain). `rows`: this process's share of the batch: the noise and times
    are drawn for the whole batch, the loss is the share's part of the whole batch's mean."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    if time_sampling == "logit_normal":
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    elif time_sampling == "uniform":
        sigma = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {time_sampling!r}")
    sigma = sigma.to(x0.device)
    if rows is not None:
        x0, noise, sigma, cond = x0[rows], noise[rows], sigma[rows], cond.index(rows)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    velocity = bundle.velocity((1 - s) * x0 + s * noise, sigma, cond)
    loss = torch.nn.functional.mse_loss(velocity.float(), (noise - x0).float())
    return loss if rows is None else loss * (x0.shape[0] / batch)


@torch.no_grad()
def teacher_samples(teachers: dict, prompts: list, routes: list[str], sampler, samples_per_prompt: int, seed: int,
                    progress: bool = True, processes: Processes | None = None) -> Tensor:
    """x0 (N * G, ...): G = samples_per_prompt samples of prompt i in rows i G ... i G + G - 1, each drawn by the
    teacher prompt i is routed to (teachers: name -> bundle). Each teacher draws from its own stream, keyed by its
    name, so its samples do not depend on the other teachers. Several processes split each chunk of rows evenly
    (a chunk that does not split is sampled whole by each) and gather them: every process returns all of x0."""
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
        bundle, generator = teachers[name], step_generator(seed, SAMPLE_STREAM, key)
        rows = [i * group + j for i in mine for j in range(group)]
        for start in range(0, len(rows), SAMPLE_BATCH):
            chunk = rows[start : start + SAMPLE_BATCH]
            share = (processes.index, processes.count) if len(chunk) % processes.count == 0 else (0, 1)
            part = chunk[processes.rows(len(chunk))] if share[1] > 1 else chunk
            cond = bundle.encode([prompts[r // group].text for r in part])
            x = sample(bundle, cond, steps=sampler.steps, shift=sampler.shift, cfg=sampler.cfg,
                       noise_level=sampler.noise_level, generator=generator,
                       log_prob_reduction=sampler.logprob_reduction, share=share)
            if share[1] > 1:
                x = torch.cat(processes.gather_objects(x.cpu())).to(x.device)
            if out is None:
                out = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device)
            out[torch.as_tensor(chunk, device=x.device)] = x
            bar.update(len(chunk))
    bar.close()
    return out


def best_of_groups(scores, group: int) -> np.ndarray:
    """Row index of each consecutive group's best score (the first on ties)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, group)
    return np.arange(len(scores)) * group + scores.argmax(axis=1)


def sft(bundle, x0: Tensor, texts: list[str], settings, seed: int, cfg_dropout: float = 0.0,
        time_sampling: str = "logit_normal", progress: bool = True, processes: Processes | None = None) -> list[dict]:
    """Fine-tune the bundle's transformer (or a LoRA adapter, settings.lora) on (x0, text) pairs with the
    flow-matching loss for settings.steps batches of settings.batch_size; a share `cfg_dropout` of each batch sees
    the empty prompt (keeps classifier-free guidance working). The text encoder stays frozen. Returns the curve.
    Several processes: each takes its rows of every batch (batch_size a multiple of the count), gradients summed."""
    processes = processes or Processes()
    torch.manual_seed(seed)  # LoRA's gaussian A
    params = list(prepare_policy(bundle, settings.lora).values())
    optimizer = make_optimizer(params, settings.lr)
    generator = step_generator(seed, TRAIN_STREAM, 0)
    cond_all, null = bundle.encode(texts), bundle.encode([""])
    curve, start = [], time.perf_counter()
    bundle.transformer.train()
    bar = tqdm(range(settings.steps), desc="sft", disable=not progress or not processes.is_main, dynamic_ncols=True)
    if settings.batch_size % processes.count:
        raise SystemExit(f"cold_start.batch_size {settings.batch_size} does not split over {processes.count} "
                         "processes: make it a multiple of the process count")
    rows = processes.rows(settings.batch_size) if processes.count > 1 else None
    for step in bar:
        idx = torch.randint(len(texts), (settings.batch_size,), generator=generator)
        drop = (torch.rand(settings.batch_size, generator=generator) < cfg_dropout).to(x0.device)
        picked = cond_all.index(idx.to(x0.device))
        cond = Condition(
            torch.where(drop[:, None, None], null.prompt_embeds, picked.prompt_embeds),
            torch.where(drop[:, None], null.pooled, picked.pooled),
        )
        loss = flow_matching_loss(bundle, x0[idx.to(x0.device)], cond, generator, time_sampling, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        processes.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = processes.sum([loss.item()])[0]  # the whole batch's loss
        curve.append({"step": step, "loss": value, "seconds": round(time.perf_counter() - start, 3)})
        bar.set_postfix(loss=f"{value:.4f}")
    bundle.transformer.eval()
    return curve


def sft_cold_start(spec, base, teachers: dict, prompts: list, tasks: list[str], progress: bool = True,
                   processes: Processes | None = None):
    """Route the prompts, sample the teachers, keep the best of each group (optional), fine-tune `base` in place.

    best_of_group scores each sample with the reward of its prompt's task of origin (with task routing, the routed
    teacher's task; rewards read the prompt's structured fields, so another task's reward would not apply).
    -> (curve, info for the provenance).
    """
    from flowopd.data import world_config
    from flowopd.rewards import task_reward

    settings, processes = spec.cold_start, processes or Processes()
    router = Router.from_spec(spec)
    routes = router.route_all(prompts, tasks)
    counts = router.summary(prompts, tasks)
    if processes.is_main:
        print(format_summary(counts))
    group = settings.samples_per_prompt
    x0 = teacher_samples(teachers, prompts, routes, settings.sampler, group, spec.seed, progress, processes)
    rows = np.arange(len(x0))
    if settings.best_of_group and group > 1:
        share = processes.split(len(x0))  # each process scores its rows; the scores are gathered
        scores = np.empty(share.stop - share.start)
        images = base.decode(x0[share])
        for task in dict.fromkeys(tasks):
            mine = np.array([r for r in rows[share] if tasks[r // group] == task], dtype=int)
            if len(mine):
                reward = task_reward(spec.tasks[task], world_config(spec))
                local = mine - share.start
                scores[local] = reward(images[local], [prompts[r // group] for r in mine])["score"]
        rows = best_of_groups(np.concatenate(processes.gather_objects(scores)), group)
    texts = [prompts[r // group].text for r in rows]
    tiny = spec.model.kind == "tiny"
    curve = sft(base, x0[torch.as_tensor(rows, device=x0.device)], texts, settings, spec.seed,
                cfg_dropout=spec.base.cfg_dropout if tiny else 0.0,
                time_sampling=spec.base.time_sampling if tiny else "logit_normal", progress=progress,
                processes=processes)
    return curve, {"routing": counts, "samples": len(rows)}


# ---------------------------------------------------------------- the phase
def run_cold_start(spec, base_dir: Path | None, teacher_dirs: dict, data_dir: Path | None, out: Path,
                   progress: bool = True) -> None:
    """Write the student's starting model to `out` atomically (a TinyBundle, curve.csv for sft, provenance)."""
    from flowopd.phases import spec_identity, write_curve

    if spec.model.kind == "sd3":
        return sd3_cold_start(spec, teacher_dirs, data_dir, out, progress)
    started, start = now(), time.time()
    settings, method = spec.cold_start, spec.cold_start.method
    processes = Processes.from_environment()  # several only for sft (stage_main refuses them otherwise)
    bundle = load_bundle(spec, base_dir)
    extra, curve, used = {}, None, []
    if method == "merge":
        used = [name for name, weight in settings.weights.items() if weight > 0]
        teachers = load_teachers(used, teacher_dirs, config=bundle.config)
        merged = merge_states(bundle.state_dict(), [teachers[n].state_dict() for n in used],
                              [settings.weights[n] for n in used], settings.mode, settings.ties_density, settings.scale)
        bundle.load_state_dict(merged)
        extra = {"mode": settings.mode, "weights": {n: settings.weights[n] for n in used}}
    elif method == "sft":
        if data_dir is None:
            raise SystemExit("an sft cold start samples the train prompts: pass --data")
        prompts, tasks = training_prompts(spec, data_dir)
        used = list(Router.from_spec(spec).summary(prompts, tasks))
        teachers = load_teachers(used, teacher_dirs, base_dir, config=bundle.config)
        curve, extra = sft_cold_start(spec, bundle, teachers, prompts, tasks, progress, processes)
        extra["prompts_sha256"] = canonical_hash([p.text for p in prompts])
    elif method != "none":
        raise SystemExit(f"unknown cold start method {method!r}")
    lora = getattr(settings, "lora", None)
    if not processes.is_main:  # the same weights everywhere; the main process writes them
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = save_policy(bundle, folder, lora)
        if curve:
            write_curve(folder / "curve.csv", curve)
        write_provenance(
            folder, "cold_start", cold_start_sub_spec(spec), **spec_identity(spec), method=method, **extra, curve=curve,
            base_dir=None if base_dir is None else str(base_dir), base_sha256=weights_sha(base_dir),
            teachers={n: {"dir": str(teacher_dirs[n]), "sha256": weights_sha(teacher_dirs[n])}
                      for n in used if n != "base"},
            processes=processes.count, started=started, finished=now(), seconds=round(time.time() - start, 2),
            weights_sha256=sha256_file(weights_file),
        )
    processes.wait()


def sd3_cold_start(spec, teacher_dirs: dict, data_dir: Path | None, out: Path, progress: bool = True) -> None:
    """sd3: the student's starting adapter. merge: from the teachers' (merged_adapter; no model is loaded). sft: a
    new adapter on the base fitted to samples of the teachers' adapters, all on one transformer. none: an artifact
    without adapter (OPD starts a fresh one on the base)."""
    from flowopd.models.sd3 import read_adapter, write_adapter
    from flowopd.phases import spec_identity, write_curve

    started, start = now(), time.time()
    settings, method = spec.cold_start, spec.cold_start.method
    processes = Processes.from_environment()  # several only for sft (stage_main refuses them otherwise)
    extra, used, write_weights, curve = {}, [], None, None  # write_weights(folder) -> the weights file
    if method == "merge":
        used = [name for name, weight in settings.weights.items() if weight > 0]
        require_teacher_dirs(used, teacher_dirs)
        adapters = [read_adapter(teacher_dirs[name]) for name in used]
        state, config = merged_adapter([a for a, _ in adapters], [c for _, c in adapters],
                                       [settings.weights[n] for n in used], settings.mode, settings.ties_density,
                                       settings.scale, settings.lora_merge)
        extra = {"mode": settings.mode, "weights": {n: settings.weights[n] for n in used}, "rank": config["rank"]}

        def write_weights(folder):
            return write_adapter(folder, state, config)
    elif method == "sft":
        if data_dir is None:
            raise SystemExit("an sft cold start samples the train prompts: pass --data")
        lora = settings.lora or spec.model.lora
        if lora is None:
            raise SystemExit("an sd3 student is a LoRA adapter beside the teachers': set cold_start.lora or model.lora")
        prompts, tasks = training_prompts(spec, data_dir)
        used = list(Router.from_spec(spec).summary(prompts, tasks))
        require_teacher_dirs(used, teacher_dirs)
        bundle = load_bundle(spec, None, processes.device)
        for name in used:
            if name != "base":
                bundle.load_adapter(name, teacher_dirs[name], trainable=False)
        teachers = {name: bundle.adapter_bundle(None if name == "base" else name) for name in used}
        sft_spec = spec.model_copy(update={"cold_start": settings.model_copy(update={"lora": lora})})  # sft trains it
        curve, extra = sft_cold_start(sft_spec, bundle, teachers, prompts, tasks, progress, processes)
        extra["prompts_sha256"] = canonical_hash([p.text for p in prompts])

        def write_weights(folder):
            write_curve(folder / "curve.csv", curve)
            return bundle.save_adapter(ADAPTER, folder, lora.model_dump(mode="json"))
    if not processes.is_main:  # the same adapter everywhere; the main process writes it
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = write_weights(folder) if write_weights is not None else None
        write_provenance(
            folder, "cold_start", cold_start_sub_spec(spec), **spec_identity(spec), method=method, **extra, curve=curve,
            teachers={n: {"dir": str(teacher_dirs[n]), "sha256": weights_sha(teacher_dirs[n])}
                      for n in used if n != "base"},
            processes=processes.count, started=started, finished=now(), seconds=round(time.time() - start, 2),
            weights_sha256=None if weights_file is None else sha256_file(weights_file),
        )
    processes.wait()


# ---------------------------------------------------------------- command line
def parse_teacher_dirs(values: list[str] | None, spec) -> dict[str, Path]:
    """['text=artifacts/teacher/abc', ...] -> {name: Path}; names must be the spec's teachers, each given once."""
    dirs: dict[str, Path] = {}
    for value in values or ():
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--teacher expects NAME=DIR, got {value!r}")
        if name not in spec.teachers:
            raise SystemExit(f"--teacher {name}: unknown teacher; the spec has {', '.join(spec.teachers)}")
        if name in dirs:
            raise SystemExit(f"--teacher {name} given twice")
        dirs[name] = Path(folder)
    return dirs


def stage_parser(phase: str) -> argparse.ArgumentParser:
    """The options the cold_start and opd stages share."""
    parser = argparse.ArgumentParser(prog=f"stages/{phase}.py", description=f"run the {phase} phase of a spec")
    parser.add_argument("--spec", required=True, type=Path, help="spec YAML file")
    parser.add_argument("--base", type=Path, help="base model artifact folder (tiny specs)")
    parser.add_argument("--teacher", action="append", metavar="NAME=DIR", help="a teacher artifact (repeatable)")
    parser.add_argument("--data", type=Path, help="prompt sets folder (data phase)")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder to write (atomically)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def stage_main(argv: list[str] | None = None) -> None:
    """Command line of stages/cold_start.py (sft: FLOWOPD_PROCESSES=N, N processes; merge and none: one)."""
    from flowopd.launch import refuse_several_processes, relaunch_if_asked
    from flowopd.phases import check_stage_key
    from flowopd.spec import load_spec_or_exit

    args = stage_parser("cold_start").parse_args(argv)
    spec = load_spec_or_exit(args.spec)
    if spec.cold_start.method != "sft":
        refuse_several_processes("cold_start")
    elif argv is None:
        relaunch_if_asked()
    check_stage_key(spec, args.spec, "cold_start", args.out)
    teacher_dirs = parse_teacher_dirs(args.teacher, spec)
    run_cold_start(spec, args.base, teacher_dirs, args.data, args.out, not args.no_progress)

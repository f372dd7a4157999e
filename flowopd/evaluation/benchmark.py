"""Eval phase: a model on every benchmark with the ODE sampler over several seeds.

Scores the prompt split `evaluation.split` names (val: tuning; test: the report). Writes `metrics.json` (the split;
per benchmark, per metric: one value per seed, their mean and std, and the headline),
`samples.jsonl` (per-sample scores) and `grid_<task>.png` (the first images of seed 0, captioned). Beside the
reward's metrics, `prompt_ignoring` is the share of samples flowopd.evaluation.exploits flags (per sample: its 0 / 1 flag).

Several processes (accelerate launch) split each seed's sampling batches round-robin; batch b draws its noise from
the seed and its first prompt's index whichever process samples it, so every image is the 1-process one. Each
process scores its own images; the scores and images are gathered in prompt order (the exploit detector compares
images across prompts, so it runs on the gathered benchmark).

A failure loses no finished batch: with `kept` (ScoredBatches), each batch's images are kept on disk once sampled and
its scores once scored, and the next run of the same evaluation (same weights, settings and code) takes them from
there instead of sampling and scoring again, so a reward server that dies at the last benchmark costs one batch.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from flowopd.evaluation.exploits import prompt_ignoring
from flowopd.flow.sampler import sample
from flowopd.models.bundle import micro_batched_decode, sampling_transformer
from flowopd.rewards import task_reward
from flowopd.runtime.artifacts import write_json
from flowopd.runtime.processes import Processes
from flowopd.world.prompt_sets import read_prompts, world_config

EVAL_BATCH = {"tiny": 64, "sd3": 8}  # prompts per sampling call (the noise depends on it); sd3: 16 rows with CFG


@torch.no_grad()
def generate(bundle, prompts, sampler, seed: int, batch_size: int = 64, progress=None, first: int = 0,
             micro_batch: int | None = None, decode_batch: int | None = None, transformer=None) -> np.ndarray:
    """Images for `prompts` with the spec's sampler; the batch starting at prompt i of the benchmark draws its
    noise from seed and i (`first`: the index of prompts[0] in the benchmark's list). micro_batch / decode_batch:
    prompts per transformer forward / images per VAE decode within a batch (None: the whole batch). transformer:
    the one that samples (flowopd.models.bundle.sampling_transformer; None: the bundle's)."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        texts = [p.text for p in prompts[start : start + batch_size]]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first + start)
        x = sample(
            bundle,
            bundle.encode(texts),
            steps=sampler.steps,
            shift=sampler.shift,
            cfg=sampler.cfg,
            noise_level=sampler.noise_level,
            generator=generator,
            micro_batch=micro_batch,
            transformer=transformer,
        )
        chunks.append(micro_batched_decode(bundle, x, decode_batch))
        if progress is not None:
            progress.update(len(texts))
    return np.concatenate(chunks)


class ScoredBatches:
    """Finished evaluation batches in `folder`: <task>-<seed>-<start>.npy (its images, kept once sampled) and .json
    (its prompts, and its scores once scored). A batch whose prompts differ is sampled afresh. Written atomically;
    read with allow_pickle=False. None: keep nothing (ScoredBatches(None) does nothing)."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, task: str, seed: int, start: int) -> tuple[Path, Path]:
        stem = self.folder / f"{task}-{seed}-{start}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def load(self, task: str, seed: int, start: int, texts: list[str]) -> tuple[np.ndarray | None, dict | None]:
        """(images or None, scores or None) that a previous run finished for this batch."""
        if self.folder is None:
            return None, None
        images_path, record_path = self._paths(task, seed, start)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            images = np.load(images_path, allow_pickle=False)
        except (OSError, ValueError):
            return None, None
        if record.get("prompts") != texts or len(images) != len(texts):
            return None, None
        scores = record.get("scores")
        return images, None if scores is None else {m: np.asarray(v, dtype=np.float64) for m, v in scores.items()}

    def keep(self, task: str, seed: int, start: int, texts: list[str], images: np.ndarray,
             scores: dict | None = None) -> None:
        """Keep a batch's images (scores None: not scored yet), or its scores beside the images kept before."""
        if self.folder is None:
            return
        images_path, record_path = self._paths(task, seed, start)
        if scores is None:
            with open(images_path.with_suffix(".npy.partial"), "wb") as file:
                np.save(file, images, allow_pickle=False)
            os.replace(images_path.with_suffix(".npy.partial"), images_path)
        record = {"prompts": texts, "scores": None if scores is None else {m: v.tolist() for m, v in scores.items()}}
        record_path.with_suffix(".partial").write_text(json.dumps(record), encoding="utf-8")
        os.replace(record_path.with_suffix(".partial"), record_path)


def scored_batch(bundle, reward, batch: list, evaluation, seed: int, size: int, start: int, task: str,
                 kept: ScoredBatches, transformer=None) -> tuple[dict, np.ndarray]:
    """({metric: scores}, images) of the benchmark's batch at `start`: what `kept` holds of it, the rest sampled
    and scored (and kept as soon as it is)."""
    texts = [p.text for p in batch]
    images, scores = kept.load(task, seed, start, texts)
    if images is None:
        images = generate(bundle, batch, evaluation.sampler, seed, size, first=start,
                          micro_batch=evaluation.micro_batch, decode_batch=evaluation.decode_batch,
                          transformer=transformer)
        kept.keep(task, seed, start, texts, images)
    if scores is None:
        scores = {metric: np.asarray(values, dtype=np.float64) for metric, values in reward(images, batch).items()}
        kept.keep(task, seed, start, texts, images, scores)
    return scores, images


def image_grid(images: np.ndarray, captions: list[str], columns: int = 8, scale: int = 4) -> Image.Image:
    """Upscaled images (nearest, so pixels stay honest) with their prompt below each."""
    font = ImageFont.load_default(size=11)
    size = images.shape[1] * scale
    cell_w, cell_h = max(size, 150), size + 28
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (x + (cell_w - size) // 2, y))
        lines = [caption[j : j + 26] for j in range(0, min(len(caption), 52), 26)]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + size + 1 + 12 * k), line, fill="black", font=font)
    return grid


def evaluate(bundle, spec, prompts_folder: Path, out: Path | None, progress: bool = True,
             processes: Processes | None = None, kept: ScoredBatches | None = None) -> dict:
    """Score `bundle` on the spec's benchmarks; write results into `out` (None: write nothing, as every process but
    the main one); return the metrics record. kept: the finished batches of an earlier failed run (module docstring)."""
    evaluation, processes, kept = spec.evaluation, processes or Processes(), kept or ScoredBatches(None)
    size = EVAL_BATCH[spec.model.kind]
    transformer = sampling_transformer(bundle, evaluation.dtype)
    benchmarks = {}
    sample_rows = []
    for task_name in evaluation.benchmarks:
        task = spec.tasks[task_name]
        prompts = read_prompts(prompts_folder, task_name, evaluation.split)[: evaluation.n_prompts]
        reward = task_reward(task, world_config(spec))  # the trainers' reward, in the spec's world
        per_seed: dict[str, list[float]] = {}
        bar = tqdm(total=len(prompts) * len(evaluation.seeds), desc=f"eval {task_name}",
                   disable=not progress or not processes.is_main)
        for seed in evaluation.seeds:
            mine = []  # (first prompt index, {metric: scores}, images) of this process's batches
            for start in range(size * processes.index, len(prompts), size * processes.count):
                batch = prompts[start : start + size]
                scores, images = scored_batch(bundle, reward, batch, evaluation, seed, size, start, task_name, kept,
                                              transformer)
                mine.append((start, scores, images))
                bar.update(len(batch) * processes.count)
            parts = sorted((part for shares in processes.gather_objects(mine) for part in shares),
                           key=lambda part: part[0])
            scores = {metric: np.concatenate([part[1][metric] for part in parts]) for metric in parts[0][1]}
            images = np.concatenate([part[2] for part in parts])
            scores["prompt_ignoring"] = prompt_ignoring(images, prompts, reward, scores["score"], task.normaliser)
            for metric, values in scores.items():
                per_seed.setdefault(metric, []).append(float(np.mean(values)))
            for i, prompt in enumerate(prompts):
                row = {"benchmark": task_name, "seed": seed, "index": i, "prompt": prompt.text}
                sample_rows.append(row | {m: float(v[i]) for m, v in scores.items()})
            if seed == evaluation.seeds[0] and out is not None:
                n = evaluation.grid_size
                image_grid(images[:n], [p.text for p in prompts[:n]]).save(out / f"grid_{task_name}.png")
        bar.close()
        benchmarks[task_name] = {
            "n": len(prompts),
            "headline": task.metric,
            "metrics": {
                metric: {
                    "seeds": dict(zip(map(str, evaluation.seeds), values)),
                    "mean": statistics.fmean(values),
                    "std": statistics.pstdev(values),
                }
                for metric, values in per_seed.items()
            },
        }
    record = {
        "split": evaluation.split,  # the ledger keeps it: the report leaves val evaluations out
        "benchmarks": benchmarks,
        "headline": {t: b["metrics"][b["headline"]]["mean"] for t, b in benchmarks.items()},
    }
    if out is not None:
        write_json(out / "metrics.json", record)
        (out / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sample_rows))
    return record

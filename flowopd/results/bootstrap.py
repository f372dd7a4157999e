"""Bootstrap confidence intervals of benchmark means, resampling prompts (each with all its seeds).

A benchmark cell is a matrix of scores, prompts x seeds. Its mean is the mean over prompts of r_p, prompt p's mean
over seeds. The prompt is the unit sampled from a population (seeds are the sampler's noise on that prompt, and a
prompt's seeds are correlated: same text, same difficulty), so a resample draws P prompts with replacement and keeps
each drawn prompt's seeds together: the cluster bootstrap. With counts w (how often each prompt was drawn),
the resampled mean is w . r / P, so B resamples of every cell of one design are one matrix product W @ R / P.

Pairing: the resample counts W depend only on the design (benchmark, the ordered prompts, the seeds), through a
fixed seed. Two rows evaluated on the same prompts and seeds therefore share W, and the draws of their difference,
W @ (r_a - r_b) / P, are the paired bootstrap; rows of different designs get independent W (unpaired). Sums over
benchmarks (avg) add draws of independent prompt sets. The interval is the percentile interval of the draws.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000  # Monte Carlo error of a 95% percentile bound: about 1% of the interval's width
SEED = 20260513  # fixed: the same ledger gives the same intervals, bit for bit
LEVEL = 0.95


@dataclass(frozen=True)
class Design:
    """What a cell's scores were measured on: rows with equal designs are paired."""

    benchmark: str
    prompts: tuple[tuple[int, str], ...]  # (index, text) in index order
    seeds: tuple[int, ...]

    def rng(self) -> np.random.Generator:
        digest = hashlib.sha256(json.dumps([SEED, self.benchmark, self.prompts, self.seeds]).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def resample_counts(design: Design, resamples: int = RESAMPLES) -> np.ndarray:
    """(resamples, P): how often each prompt is drawn in each resample of P prompts with replacement; a function
    of the design only."""
    n = len(design.prompts)
    drawn = design.rng().integers(0, n, (resamples, n)) + n * np.arange(resamples)[:, None]  # offset per resample
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def draws(design: Design, per_prompt: np.ndarray, resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap draws of the mean of each column of `per_prompt` (P x k prompt means): (resamples, k)."""
    per_prompt = np.asarray(per_prompt, dtype=np.float64).reshape(len(design.prompts), -1)
    return resample_counts(design, resamples) @ per_prompt / len(design.prompts)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap draws (1-d)."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap draws; differences of estimates pair through shared designs."""

    mean: float
    draws: np.ndarray  # (RESAMPLES,)
    designs: frozenset  # the designs whose resamples the draws used

    @property
    def lo(self) -> float:
        return interval(self.draws)[0]

    @property
    def hi(self) -> float:
        return interval(self.draws)[1]

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.mean - other.mean, self.draws - other.draws, self.designs | other.designs)

    def pairing(self, other: Estimate) -> str:
        """How the draws of `self - other` pair: 'paired' (same prompts and seeds everywhere), 'partial' (on some
        benchmarks) or 'unpaired' (independent resamples: a wider, conservative interval if the prompts overlap)."""
        if self.designs == other.designs:
            return "paired"
        return "partial" if self.designs & other.designs else "unpaired"

    @staticmethod
    def average(parts: list[Estimate], weights: list[float]) -> Estimate:
        """sum_i weights_i * part_i, e.g. avg = mean over tasks of mean / normaliser."""
        return Estimate(float(sum(w * p.mean for p, w in zip(parts, weights))),
                        sum(w * p.draws for p, w in zip(parts, weights)),
                        frozenset().union(*(p.designs for p in parts)))


def estimate(cells: dict) -> dict:
    """{key: (design, prompt means r of shape (P,))} -> {key: Estimate}; one matrix product per design."""
    by_design: dict[Design, list] = {}
    for key, (design, per_prompt) in cells.items():
        by_design.setdefault(design, []).append((key, np.asarray(per_prompt, dtype=np.float64)))
    estimates = {}
    for design, members in by_design.items():
        matrix = draws(design, np.column_stack([r for _, r in members]))
        for column, (key, per_prompt) in enumerate(members):
            estimates[key] = Estimate(float(per_prompt.mean()), matrix[:, column], frozenset([design]))
    return estimates

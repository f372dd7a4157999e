"""Bootstrap confidence intervals of benchmark means: training seeds, then distinct prompts, each with its seeds.

A report row may hold several trained models (one per training seed); a benchmark cell of one model is a table of
scores, prompt rows x evaluation seeds. A benchmark repeats prompt texts (128 rows of 16 distinct texts, each 8x),
and rows of one text are not independent draws from a population of prompts: the unit sampled is the distinct text.
So the bootstrap is hierarchical, each level drawn with replacement:
(a) training seeds: a resample draws S of the row's S trained models (the variation between training runs);
(b) distinct prompts: then P of the benchmark's P distinct texts, each cluster whole (all its rows and seeds);
(c) evaluation seeds stay nested in their prompt (the sampler's noise on that prompt), never resampled apart.

With R (S x P) the means per (training seed, text) over the text's rows and seeds, n (P,) the rows per text, seed
counts u (S,) and prompt counts v (P,) of one resample, the resampled mean is the bilinear form
u^T R (v * n) / (S * v.n): the mean over drawn models of each one's mean over the drawn prompts, a text weighed by
its rows (the ratio estimator of a cluster bootstrap: with no resampling it is the cell's mean over prompt rows and
seeds, what metrics.json records). B resamples of k cells are one tensordot and one einsum. With one training seed
it is the cluster bootstrap over distinct prompts. Crossed factors resampled independently (seeds and prompts) err
on the wide side (Owen 2007, the pigeonhole bootstrap), and with 2-3 training seeds the seed level is coarse: a
percentile interval from so few models understates their spread; the interval says what these seeds show.

Pairing: the prompt counts depend only on the prompt design (benchmark, distinct texts, rows per text, evaluation
seeds) and the seed counts only on the set of training seeds (shared by every benchmark of a row: a drawn model
is evaluated on every task), each through the fixed seed. Rows sharing both share every draw, and the draws of
their difference are the paired bootstrap; rows sharing only the prompts (or only the training seeds) are paired on
that level alone ('partial'); rows sharing neither get independent draws ('unpaired'). The interval is the
percentile interval of the draws, at 95% or at the level a caller asks for (a Bonferroni correction).

A share of a subset of samples (`share_draws`: the rescue rate on the samples every teacher fails, where each
training seed has its own subset) is a ratio of sums, resampled the same way: training seeds, then the subset's
distinct prompts, each with all its samples; a resample that draws no sample of the subset is left out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

# 40,000 resamples: a Bonferroni-corrected bound sits far out in a tail (the 23 comparisons of flowopd.results.claims:
# 0.11% per tail), and 40,000 leave 45 draws beyond it where 10,000 left 11; at 95% the Monte Carlo error is ~0.3% of
# the interval's width. A draw is a (B, P) count matrix and a tensordot, milliseconds per cell.
RESAMPLES = 40_000
SEED = 20260513  # fixed: the same ledger gives the same intervals, bit for bit
LEVEL = 0.95


def _rng(*key) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([SEED, *key]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n): how often each of n units is drawn in each resample of n draws with replacement."""
    drawn = rng.integers(0, n, (resamples, n)) + n * np.arange(resamples)[:, None]  # offset per resample
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


@dataclass(frozen=True)
class Design:
    """What a cell's prompts were: cells with equal designs share their prompt draws (paired)."""

    benchmark: str
    prompts: tuple[str, ...]  # the distinct prompt texts, sorted: the clusters a resample draws
    rows: tuple[int, ...]  # prompt rows of each text (its weight in the mean)
    seeds: tuple[int, ...]  # evaluation seeds, kept with their prompt

    def counts(self, resamples: int = RESAMPLES) -> np.ndarray:
        """(resamples, P) prompt counts; a function of the design only."""
        key = ["prompts", self.benchmark, self.prompts, self.rows, self.seeds]
        return _counts(_rng(*key), len(self.prompts), resamples)


@dataclass(frozen=True)
class Training:
    """The training seeds of a row: rows with the same seeds share their seed draws (paired by seed)."""

    seeds: tuple[int, ...]

    def counts(self, resamples: int = RESAMPLES) -> np.ndarray:
        """(resamples, S) seed counts; the same for every benchmark of the row."""
        return _counts(_rng("training seeds", self.seeds), len(self.seeds), resamples)


def point(design: Design, means: np.ndarray) -> np.ndarray:
    """The means of k cells, `means` (k, S, P): mean over training seeds of the mean over prompt rows: (k,)."""
    rows, means = np.asarray(design.rows, dtype=np.float64), np.asarray(means, dtype=np.float64)
    return (means.reshape(-1, *means.shape[-2:]) @ rows / rows.sum()).mean(axis=1)


def draws(design: Design, training: Training, means: np.ndarray, resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap draws of k cells' means, `means` (k, S, P) or (S, P) per (training seed, text): (resamples, k)."""
    means = np.asarray(means, dtype=np.float64)
    means = means.reshape(-1, len(training.seeds), len(design.prompts))
    weights = design.counts(resamples) * np.asarray(design.rows, dtype=np.float64)  # (B, P): drawn rows per text
    weights /= weights.sum(axis=1, keepdims=True)
    models = training.counts(resamples) / len(training.seeds)  # (B, S)
    per_model = np.tensordot(weights, means, axes=([1], [2]))  # (B, k, S): each model's mean over drawn prompts
    return np.einsum("bs,bks->bk", models, per_model)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap draws (1-d)."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap draws; differences of estimates pair through shared designs."""

    mean: float
    draws: np.ndarray  # (RESAMPLES,)
    designs: frozenset  # the Design (and Training, if several seeds) objects whose resamples the draws used

    @property
    def lo(self) -> float:
        return interval(self.draws)[0]

    @property
    def hi(self) -> float:
        return interval(self.draws)[1]

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.mean - other.mean, self.draws - other.draws, self.designs | other.designs)

    def pairing(self, other: Estimate) -> str:
        """How the draws of `self - other` pair: 'paired' (same prompts, seeds and training seeds everywhere),
        'partial' (on some of them: other training seeds, or some benchmarks) or 'unpaired' (independent
        resamples: a wider, conservative interval if the prompts overlap)."""
        if self.designs == other.designs:
            return "paired"
        return "partial" if self.designs & other.designs else "unpaired"

    @staticmethod
    def average(parts: list[Estimate], weights: list[float]) -> Estimate:
        """sum_i weights_i * part_i, e.g. avg = mean over tasks of mean / normaliser."""
        return Estimate(float(sum(w * p.mean for p, w in zip(parts, weights))),
                        sum(w * p.draws for p, w in zip(parts, weights)),
                        frozenset().union(*(p.designs for p in parts)))


def estimate(cells: dict, resamples: int = RESAMPLES) -> dict:
    """{key: (design, training, means R of shape (S, P))} -> {key: Estimate}; one tensor product per design."""
    by_design: dict[tuple[Design, Training], list] = {}
    for key, (design, training, means) in cells.items():
        by_design.setdefault((design, training), []).append((key, np.asarray(means, dtype=np.float64)))
    estimates = {}
    for (design, training), members in by_design.items():
        stacked = np.stack([m for _, m in members])
        matrix, means = draws(design, training, stacked, resamples), point(design, stacked)
        # one training seed is drawn with certainty: no randomness to pair, so only the prompts' design counts
        designs = frozenset([design, training] if len(training.seeds) > 1 else [design])
        for column, (key, _) in enumerate(members):
            estimates[key] = Estimate(float(means[column]), matrix[:, column], designs)
    return estimates


def share_draws(key: str, seeds: tuple[int, ...], prompts: tuple[str, ...], hits: np.ndarray, totals: np.ndarray,
                resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap draws of k shares pooled over training seeds and prompts: share_j = sum hits[j] / sum totals, with
    hits (k, S, P) and totals (S, P) per (training seed, distinct prompt). All k share each resample's counts (paired:
    the draws of share_0 - share_1 are those of the difference). Returns (B', k), B' <= resamples: the resamples whose
    drawn seeds and prompts hold at least one sample (the share is conditional on a non-empty subset)."""
    hits, totals = np.asarray(hits, dtype=np.float64), np.asarray(totals, dtype=np.float64)
    models = Training(tuple(seeds)).counts(resamples)  # (B, S)
    drawn = _counts(_rng("share", key, list(seeds), list(prompts)), len(prompts), resamples)  # (B, P)
    denominators = np.einsum("bs,sp,bp->b", models, totals, drawn)
    numerators = np.einsum("bs,ksp,bp->bk", models, hits, drawn)
    kept = denominators > 0
    return numerators[kept] / denominators[kept, None]

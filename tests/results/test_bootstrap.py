"""Bootstrap intervals: ~95% coverage of a known mean, pairing narrows a difference, determinism, avg."""

import numpy as np
import pytest

from flowopd.results import bootstrap
from flowopd.results.bootstrap import Design, Estimate, estimate, interval

PROMPTS, SEEDS = 64, 2


def design(benchmark="text", prompts=PROMPTS, seeds=SEEDS, tag="") -> Design:
    return Design(benchmark, tuple((i, f"{tag}prompt {i}") for i in range(prompts)), tuple(range(seeds)))


def synthetic(rng, datasets: int, kind: str, mean: float = 0.6) -> np.ndarray:
    """Prompt means (P x datasets) of prompts x seeds scores whose population mean is `mean`.

    normal: prompt effect N(0, 0.15) + seed noise N(0, 0.1); binary: each prompt's success rate drawn from a Beta
    with mean `mean`, each seed a Bernoulli draw (like OCR exact match or GenEval strict)."""
    if kind == "normal":
        scores = mean + rng.normal(0, 0.15, (PROMPTS, 1, datasets)) + rng.normal(0, 0.1, (PROMPTS, SEEDS, datasets))
    else:
        rate = rng.beta(3 * mean, 3 * (1 - mean), (PROMPTS, 1, datasets))
        scores = (rng.random((PROMPTS, SEEDS, datasets)) < rate).astype(float)
    return scores.mean(axis=1)


@pytest.mark.parametrize("kind", ["normal", "binary"])
def test_intervals_cover_the_true_mean_about_95_percent_of_the_time(kind):
    # One design for every data set: its resample counts are independent of the data, so each data set's interval
    # is an ordinary bootstrap interval; 2,000 data sets bound the coverage's Monte Carlo error by ~0.005.
    per_prompt = synthetic(np.random.default_rng(1), 2000, kind)
    draws = bootstrap.draws(design(), per_prompt)
    lo, hi = np.quantile(draws, [0.025, 0.975], axis=0)
    coverage = np.mean((lo < 0.6) & (0.6 < hi))
    assert 0.925 <= coverage <= 0.965, coverage  # the percentile interval runs slightly short at 64 prompts
    assert np.allclose(draws.mean(axis=0), per_prompt.mean(axis=0), atol=0.01)


def test_pairing_narrows_the_interval_of_a_difference_of_correlated_rows():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 0.2, PROMPTS)  # shared by both models: their scores are correlated by prompt
    a = 0.60 + difficulty + rng.normal(0, 0.03, PROMPTS)
    b = 0.55 + difficulty + rng.normal(0, 0.03, PROMPTS)
    same = estimate({"a": (design(), a), "b": (design(), b)})
    other = estimate({"a": (design(), a), "b": (design(tag="other "), b)})  # other prompts: unpaired
    paired, unpaired = same["a"] - same["b"], other["a"] - other["b"]
    assert same["a"].pairing(same["b"]) == "paired" and other["a"].pairing(other["b"]) == "unpaired"
    assert paired.mean == unpaired.mean == pytest.approx(a.mean() - b.mean())
    width = {name: np.subtract(*interval(e.draws)[::-1]) for name, e in (("paired", paired), ("unpaired", unpaired))}
    assert width["paired"] < 0.25 * width["unpaired"]
    assert paired.lo > 0 > unpaired.lo  # only the paired interval resolves the 0.05 difference
    # the paired draws are exactly the bootstrap of the per-prompt differences
    assert np.allclose(paired.draws, bootstrap.draws(design(), a - b)[:, 0])


def test_draws_depend_on_the_design_only_and_are_deterministic():
    values = np.linspace(0, 1, PROMPTS)
    first, again = bootstrap.draws(design(), values), bootstrap.draws(design(), values)
    assert first.shape == (bootstrap.RESAMPLES, 1) and np.array_equal(first, again)
    assert not np.array_equal(first, bootstrap.draws(design(seeds=3), values))
    assert not np.array_equal(first, bootstrap.draws(design("objects"), values))
    counts = bootstrap.resample_counts(design())
    assert np.all(counts.sum(axis=1) == PROMPTS)  # each resample draws P prompts


def test_average_and_constant_cells():
    cells = estimate({"text": (design("text"), np.full(PROMPTS, 0.5)),
                      "quality": (design("quality"), np.linspace(3.0, 5.0, PROMPTS))})
    assert interval(cells["text"].draws) == (0.5, 0.5)  # no spread, no width
    avg = Estimate.average([cells["text"], cells["quality"]], [1 / 2, 1 / (2 * 5.0)])
    assert avg.mean == pytest.approx((0.5 + 4.0 / 5) / 2)
    assert avg.lo < avg.mean < avg.hi and avg.designs == {design("text"), design("quality")}
    assert avg.pairing(cells["text"]) == "partial"

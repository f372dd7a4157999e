"""Hierarchical bootstrap: ~95% coverage of a known mean, distinct prompts as clusters (wider than rows), training
seeds widen the interval, pairing narrows a difference, determinism, avg."""

import numpy as np
import polars as pl
import pytest

from flowopd.results import bootstrap
from flowopd.results.bootstrap import Design, Estimate, Training, estimate, interval
from flowopd.results.tables import _cell

PROMPTS, SEEDS = 64, 2
ONE = Training((0,))


def design(benchmark="text", prompts=PROMPTS, seeds=SEEDS, tag="", rows=1) -> Design:
    return Design(benchmark, tuple(f"{tag}prompt {i:03d}" for i in range(prompts)), (rows,) * prompts,
                  tuple(range(seeds)))


def width(draws: np.ndarray, level: float = 0.95) -> float:
    lo, hi = interval(draws, level)
    return hi - lo


def synthetic(rng, datasets: int, kind: str, mean: float = 0.6) -> np.ndarray:
    """Prompt means (datasets, 1, P) of prompts x seeds scores whose population mean is `mean`.

    normal: prompt effect N(0, 0.15) + seed noise N(0, 0.1); binary: each prompt's success rate drawn from a Beta
    with mean `mean`, each seed a Bernoulli draw (like OCR exact match or GenEval strict)."""
    if kind == "normal":
        scores = mean + rng.normal(0, 0.15, (datasets, 1, PROMPTS)) + rng.normal(0, 0.1, (datasets, SEEDS, PROMPTS))
    else:
        rate = rng.beta(3 * mean, 3 * (1 - mean), (datasets, 1, PROMPTS))
        scores = (rng.random((datasets, SEEDS, PROMPTS)) < rate).astype(float)
    return scores.mean(axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["normal", "binary"])
def test_intervals_cover_the_true_mean_about_95_percent_of_the_time(kind):
    # One design for every data set: its resample counts are independent of the data, so each data set's interval
    # is an ordinary bootstrap interval; 2,000 data sets bound the coverage's Monte Carlo error by ~0.005.
    means = synthetic(np.random.default_rng(1), 2000, kind)
    draws = bootstrap.draws(design(), ONE, means, resamples=4000)
    lo, hi = np.quantile(draws, [0.025, 0.975], axis=0)
    coverage = np.mean((lo < 0.6) & (0.6 < hi))
    assert 0.925 <= coverage <= 0.965, coverage  # the percentile interval runs slightly short at 64 prompts
    assert np.allclose(draws.mean(axis=0), means.mean(axis=(1, 2)), atol=0.01)


def test_repeated_texts_are_one_cluster_wider_than_a_row_bootstrap():
    # 16 distinct texts, each 8 rows (like the text benchmark's 128); a text's rows share its difficulty
    rng, texts, k = np.random.default_rng(3), 16, 8
    rows = 0.5 + np.repeat(rng.normal(0, 0.15, texts), k) + rng.normal(0, 0.02, texts * k)  # (128,) row means
    clustered = design(prompts=texts, rows=k)
    text_means = rows.reshape(texts, k).mean(axis=1)
    draws = bootstrap.draws(clustered, ONE, text_means[None])[:, 0]
    # one training seed: exactly the cluster bootstrap over distinct texts, a text's rows drawn together
    assert np.allclose(draws, clustered.counts() @ text_means / texts)
    assert bootstrap.point(clustered, text_means[None, None])[0] == pytest.approx(rows.mean())
    # the same interval as a bootstrap of the 16 texts listed once (other draws: Monte Carlo error only) ...
    once = bootstrap.draws(design(prompts=texts, tag="once "), ONE, text_means[None])[:, 0]
    assert width(draws) == pytest.approx(width(once), rel=0.05)
    # ... and about sqrt(8) times the row bootstrap's, which takes the 128 rows as independent prompts
    by_row = bootstrap.draws(design(prompts=texts * k), ONE, rows[None])[:, 0]
    assert width(draws) > 2.2 * width(by_row)


def test_cells_from_samples_cluster_rows_by_text_and_keep_training_seeds_apart():
    rng = np.random.default_rng(4)
    records = [{"training_seed": t, "prompt_index": i, "prompt": f"word {i % 4}", "seed": s,
                "value": float(rng.random())} for t in (0, 3) for i in range(12) for s in (0, 1, 2)]
    group = pl.DataFrame(records)
    cell_design, training, means = _cell("text", group)
    assert cell_design.prompts == ("word 0", "word 1", "word 2", "word 3") and cell_design.rows == (3, 3, 3, 3)
    assert cell_design.seeds == (0, 1, 2) and training == Training((0, 3)) and means.shape == (2, 4)
    per_seed = group.group_by("training_seed").agg(pl.col("value").mean()).sort("training_seed")["value"]
    assert bootstrap.point(cell_design, means)[0] == pytest.approx(per_seed.mean())  # mean of per-seed means
    assert _cell("text", group.slice(1)) is None  # a missing sample: no interval


def test_training_seeds_whose_means_differ_widen_the_interval():
    rng = np.random.default_rng(5)
    prompts = 0.5 + rng.normal(0, 0.1, PROMPTS)
    seeds = Training((0, 1, 2))
    apart = prompts[None] + np.array([[-0.1], [0.0], [0.1]])  # three trained models far apart
    pooled = apart.mean(axis=0, keepdims=True)  # the same scores, seeds ignored (one model)
    hierarchical = bootstrap.draws(design(), seeds, apart)[:, 0]
    ignoring = bootstrap.draws(design(), ONE, pooled)[:, 0]
    assert hierarchical.mean() == pytest.approx(ignoring.mean(), abs=0.005)
    assert width(hierarchical) > 3 * width(ignoring)
    # models that agree add nothing: the seed draws then cancel exactly, the same prompt draws remain
    agree = bootstrap.draws(design(), seeds, np.repeat(prompts[None], 3, axis=0))[:, 0]
    assert np.allclose(agree, bootstrap.draws(design(), ONE, prompts[None])[:, 0])
    # the seed draws are shared by every benchmark of a row: the same design of seeds, the same counts
    assert np.array_equal(seeds.counts(), Training((0, 1, 2)).counts())
    assert np.all(seeds.counts().sum(axis=1) == 3)


def test_pairing_narrows_the_interval_of_a_difference_of_correlated_rows():
    rng, seeds = np.random.default_rng(2), Training((0, 1, 2))
    difficulty = rng.normal(0, 0.2, PROMPTS)  # shared by both rows: their scores are correlated by prompt
    a = 0.60 + difficulty + rng.normal(0, 0.03, (3, PROMPTS))
    b = 0.55 + difficulty + rng.normal(0, 0.03, (3, PROMPTS))
    same = estimate({"a": (design(), seeds, a), "b": (design(), seeds, b)})
    other = estimate({"a": (design(), seeds, a), "b": (design(tag="other "), Training((7, 8, 9)), b)})  # unpaired
    paired, unpaired = same["a"] - same["b"], other["a"] - other["b"]
    assert same["a"].pairing(same["b"]) == "paired" and other["a"].pairing(other["b"]) == "unpaired"
    assert paired.mean == unpaired.mean == pytest.approx(a.mean() - b.mean())
    assert width(paired.draws) < 0.25 * width(unpaired.draws)
    assert paired.lo > 0 > unpaired.lo  # only the paired interval resolves the 0.05 difference
    # the paired draws are exactly the hierarchical bootstrap of the per-(seed, prompt) differences
    assert np.allclose(paired.draws, bootstrap.draws(design(), seeds, a - b)[:, 0])
    # other training seeds, the same prompts: paired over prompts only, still far narrower than unpaired
    partial = estimate({"a": (design(), seeds, a), "b": (design(), Training((4, 5, 6)), b)})
    assert partial["a"].pairing(partial["b"]) == "partial"
    assert width((partial["a"] - partial["b"]).draws) < 0.5 * width(unpaired.draws)


def test_draws_depend_on_the_design_only_and_are_deterministic():
    values = np.linspace(0, 1, PROMPTS)[None]
    first, again = bootstrap.draws(design(), ONE, values), bootstrap.draws(design(), ONE, values)
    assert first.shape == (bootstrap.RESAMPLES, 1) and np.array_equal(first, again)
    assert not np.array_equal(first, bootstrap.draws(design(seeds=3), ONE, values))
    assert not np.array_equal(first, bootstrap.draws(design("objects"), ONE, values))
    counts = design().counts()
    assert np.all(counts.sum(axis=1) == PROMPTS)  # each resample draws P prompts


def test_average_and_constant_cells():
    cells = estimate({"text": (design("text"), ONE, np.full((1, PROMPTS), 0.5)),
                      "quality": (design("quality"), ONE, np.linspace(3.0, 5.0, PROMPTS)[None])})
    assert interval(cells["text"].draws) == (0.5, 0.5)  # no spread, no width
    avg = Estimate.average([cells["text"], cells["quality"]], [1 / 2, 1 / (2 * 5.0)])
    assert avg.mean == pytest.approx((0.5 + 4.0 / 5) / 2)
    assert avg.lo < avg.mean < avg.hi and avg.designs == {design("text"), design("quality")}  # one seed: no draw
    assert avg.pairing(cells["text"]) == "partial"


def test_share_draws_pool_each_resample_and_leave_out_empty_ones():
    hits = np.array([[[1, 0, 2], [0, 1, 0]], [[0, 0, 1], [1, 1, 0]]], dtype=float)  # k=2 shares, S=2 seeds, P=3
    totals = np.array([[2, 0, 3], [0, 1, 1]], dtype=float)  # seed 0 has no sample of prompt b: a resample may be empty
    key, seeds, prompts, resamples = "k", (0, 1), ("a", "b", "c"), 400
    draws = bootstrap.share_draws(key, seeds, prompts, hits, totals, resamples)
    models = Training(seeds).counts(resamples)
    drawn = bootstrap._counts(bootstrap._rng("share", key, list(seeds), list(prompts)), len(prompts), resamples)
    expected = []
    for u, v in zip(models, drawn):  # the definition, one resample at a time
        weight = u[:, None] * v[None, :]
        if (weight * totals).sum() > 0:
            expected.append([(weight * h).sum() / (weight * totals).sum() for h in hits])
    assert 0 < resamples - len(expected) < resamples // 2  # some resamples drew no sample, most did
    assert np.allclose(draws, expected)
    assert np.array_equal(draws, bootstrap.share_draws(key, seeds, prompts, hits, totals, resamples))  # fixed seed

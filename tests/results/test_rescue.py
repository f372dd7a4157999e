"""The rescue where every teacher fails: the failure set per training seed, the student's and the retrained teacher's
rescue rates on hand-made samples, the paired interval, and unresolved rows with their reasons."""

import numpy as np
import polars as pl
import pytest
from test_ledger import make_shard
from test_tables import set_training_seeds

from flowopd.results import claims, tables
from flowopd.results.bootstrap import share_draws
from flowopd.results.claims import claims_frame
from flowopd.results.ledger import ingest
from flowopd.results.report import build
from flowopd.results.rescue import rescue, rescue_frame

# text scores and prompt_ignoring flags per model and training seed: [[per prompt] eval seed 0, [...] eval seed 1]
TEXT = {
    ("teacher:text", 0): ([[0.2, 0.8, 0.3, 0.1], [0.4, 0.9, 0.2, 0.6]], [[0, 1, 0, 0], [0, 0, 0, 0]]),
    ("teacher:objects", 0): ([[0.1, 0.1, 0.6, 0.2], [0.3, 0.1, 0.1, 0.1]], [[0] * 4, [0] * 4]),
    ("teacher:quality", 0): ([[0.3, 0.2, 0.1, 0.4], [0.2, 0.3, 0.4, 0.2]], [[0] * 4, [0] * 4]),
    ("flow_opd", 0): ([[0.9, 0.9, 0.9, 0.7], [0.6, 0.9, 0.3, 0.9]], [[0, 0, 0, 1], [0, 0, 0, 0]]),
    ("teacher:text", 1): ([[0.9, 0.1, 0.9, 0.4], [0.9, 0.9, 0.2, 0.9]], [[1, 0, 0, 0], [0, 0, 0, 0]]),
    ("teacher:objects", 1): ([[0.9, 0.1, 0.9, 0.9], [0.9] * 4], [[0] * 4, [0] * 4]),
    ("teacher:quality", 1): ([[0.9, 0.1, 0.9, 0.9], [0.9] * 4], [[0] * 4, [0] * 4]),
    ("flow_opd", 1): ([[0.8] * 4, [0.8] * 4], [[0] * 4, [0] * 4]),
}
# F_0 = every teacher of seed 0 below 0.5: (prompt 0, eval seed 0), (3, 0), (0, 1), (2, 1); F_1 = (1, 0) alone.
# Student: seed 0 rescues (0, 0) and (0, 1) ((3, 0) scores 0.7 but is flagged, (2, 1) scores 0.3); seed 1 (1, 0):
# 3 of 5. Control, the text teacher of the other seed: seed 1's on F_0 rescues (0, 1) alone ((0, 0) is flagged);
# seed 0's on F_1 scores 0.8 on (1, 0) but is flagged: 1 of 5.


def shards_of(tmp_path):
    """Eight shards, four models x training seeds 0 and 1: text as above; objects every teacher 0.9 (F empty);
    quality (normaliser 5) every teacher 2.0 (0.4 normalised: all fail), the student 3.0 (0.6: all rescued)."""
    shards = {}
    for (model, seed), (scores, flags) in TEXT.items():
        teacher = model.startswith("teacher:")
        quality = [[2.0 if teacher else 3.0] * 4] * 2
        samples = {"text": {"score": scores, "prompt_ignoring": flags},
                   "objects": {"strict": [[0.9 if teacher else 0.2] * 4] * 2, "prompt_ignoring": [[0] * 4] * 2},
                   "quality": {"score": quality, "prompt_ignoring": [[0] * 4] * 2}}
        shards[make_shard(tmp_path / f"eval/{model.replace(':', '-')}-{seed}", model, samples=samples)] = seed
    return shards


@pytest.fixture
def seeded(tmp_path):
    db, shards = tmp_path / "reports/ledger.duckdb", shards_of(tmp_path)
    ingest(list(shards), db)
    set_training_seeds(db, shards)
    return db, shards


def test_rescue_rates_on_a_hand_made_failure_set(seeded):
    db, shards = seeded
    results = tables.load(db, list(shards))
    text = rescue(results, "text")
    assert (text.failures, text.n_seeds, text.n_prompts, text.reason) == (5, 2, 4, None)
    assert (text.student_rate, text.control_rate, text.estimate) == pytest.approx((0.6, 0.2, 0.4))
    # seed 1's student rescues all of F_0 (0.8, unflagged); seed 0's rescues (1, 0) of F_1 (0.9, unflagged): 5 of 5
    assert text.student_other_seeds_rate == pytest.approx(1.0)
    # the draws are those of the pooled shares per (training seed, distinct prompt) counted by hand
    hits = np.array([[[2, 0, 0, 0], [0, 1, 0, 0]],   # student: seed 0 prompt 0 twice; seed 1 prompt 1
                     [[1, 0, 0, 0], [0, 0, 0, 0]]])  # control: seed 1's teacher on (0, 1)
    totals = np.array([[2, 0, 1, 1], [0, 1, 0, 0]])
    shares = share_draws("rescue text", (0, 1), tuple(f"text prompt {i}" for i in range(4)), hits, totals)
    assert np.array_equal(text.draws, shares[:, 0] - shares[:, 1])

    quality = rescue(results, "quality")  # normalised: 2.0 / 5 fails, 3.0 / 5 succeeds
    assert (quality.failures, quality.student_rate, quality.control_rate) == (16, 1.0, 0.0)
    assert np.all(quality.draws == 1.0)
    objects = rescue(results, "objects")
    assert (objects.failures, objects.reason, objects.draws) == (0, "no objects sample that every teacher fails", None)

    frame = rescue_frame(results)
    assert frame.columns == ["task", "failures", "student_rate", "control_rate", "student_other_seeds_rate",
                             "n_seeds", "n_prompts"]
    assert frame.rows() == [("text", 5, pytest.approx(0.6), pytest.approx(0.2), pytest.approx(1.0), 2, 4),
                            ("objects", 0, None, None, None, 2, 0), ("quality", 16, 1.0, 0.0, 1.0, 2, 4)]


def test_rescue_claim_rows_and_their_verdicts(seeded, tmp_path, monkeypatch):
    db, shards = seeded
    results = tables.load(db, list(shards))
    guarded = {r["metric"]: r for r in claims_frame(results).filter(
        pl.col("claim") == "rescue_all_teachers_fail").iter_rows(named=True)}
    assert guarded["quality"]["verdict"] == "unresolved" and guarded["quality"]["lo"] == 1.0  # 4 prompts: no verdict
    assert guarded["quality"]["reason"] == "4 distinct test prompts, fewer than the 20 a verdict needs"
    monkeypatch.setattr(claims, "MIN_PROMPTS", 1)  # the rescue rule itself, on this small fixture
    frame = claims_frame(results)
    rows = {r["metric"]: r for r in frame.filter(pl.col("claim") == "rescue_all_teachers_fail").iter_rows(named=True)}
    m = frame.height
    assert m == 23 and list(rows) == ["text", "objects", "quality"]
    quality = rows["quality"]  # rescued every time, by the student alone: lo = hi = 1 > 0.01
    assert (quality["estimate"], quality["lo"], quality["hi"], quality["verdict"]) == (1.0, 1.0, 1.0, "holds")
    assert (quality["a"], quality["b"], quality["pairing"], quality["n_seeds"]) == (
        "flow_opd", "teacher:quality", "paired", 2)
    text = rows["text"]
    expected = np.quantile(rescue(results, "text").draws, [0.025 / m, 1 - 0.025 / m])
    assert (text["lo"], text["hi"]) == pytest.approx(tuple(expected), abs=1e-12)
    assert text["lo"] <= 0.4 <= text["hi"] and text["level"] == pytest.approx(1 - 0.05 / m)
    assert text["verdict"] == ("holds" if text["lo"] > 0.01 else "fails" if text["hi"] < 0.01 else "unresolved")
    objects = rows["objects"]
    assert (objects["verdict"], objects["estimate"], objects["lo"]) == ("unresolved", None, None)
    assert objects["reason"] == "no objects sample that every teacher fails"

    out = tmp_path / "reports"
    build(list(shards), db, out)  # still with MIN_PROMPTS 1
    assert pl.read_csv(out / "rescue.csv")["failures"].to_list() == [5, 0, 16]
    readme = (out / "README.md").read_text()
    assert "| text | 5 | 0.600 | 0.200 | 1.000 | 2 | 4 |" in readme and "| objects | 0 | – | – | – | 2 | 0 |" in readme
    assert ("`flow_opd` − `teacher:quality` rescue rate on quality = +1.000 [+1.000, +1.000] (paired; 2 training "
            "seeds, 4 distinct prompts): holds") in readme


def test_one_training_seed_or_no_flags_leave_the_rescue_unresolved(seeded):
    db, shards = seeded
    first = [shard for shard, seed in shards.items() if seed == 0]
    alone = rescue(tables.load(db, first), "text")  # seed 0 alone: F_0, but no teacher of another seed
    assert (alone.failures, alone.student_rate, alone.control_rate, alone.draws) == (4, 0.5, None, None)
    assert alone.reason == "one training seed: no teacher of another seed to compare with"
    results = tables.load(db, list(shards))
    results.samples = results.samples.filter(pl.col("metric") != "prompt_ignoring")  # an evaluation without flags
    unflagged = rescue(results, "text")
    assert unflagged.draws is None
    assert unflagged.reason == "no `prompt_ignoring` flags for flow_opd (training seed 0) on text"
    results.samples = None
    assert rescue(results, "text").reason == "no per-sample scores"
    without = tables.load(db, [s for s in shards if "teacher-objects" not in s.name])
    assert rescue(without, "text").reason == "row teacher:objects missing"

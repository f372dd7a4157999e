"""The paper's claims as data: one row per comparison, non-inferiority and superiority margins, Bonferroni-corrected
intervals, missing rows unresolved and named, never a crash."""

import numpy as np
import polars as pl
import pytest
from test_ledger import make_shard
from test_report import scored

from flowopd.cli import main
from flowopd.results import tables
from flowopd.results.claims import (
    CSV_COLUMNS,
    EFFECT_MARGIN,
    TEACHER_MARGIN,
    bonferroni_level,
    claim_lines,
    claims,
    claims_frame,
    csv_frame,
    overall,
)
from flowopd.results.claims import decide as claims_decide
from flowopd.results.ledger import ingest


def decide(claim: str, lo: float, hi: float) -> str:
    margin = TEACHER_MARGIN if claim == "student_matches_teachers" else EFFECT_MARGIN
    return claims_decide(claim, lo, hi, margin)


def test_verdict_rules_on_hand_made_intervals():
    # equivalence: "matches" holds when the whole interval lies within 0.03 of the teacher, on either side
    assert decide("student_matches_teachers", -0.029, 0.029) == "holds"
    assert decide("student_matches_teachers", -0.029, -0.001) == "holds"
    assert decide("student_matches_teachers", -0.02, 0.05) == "unresolved"  # maybe far above it: not shown to match
    assert decide("student_matches_teachers", -0.05, -0.031) == "fails"
    assert decide("student_matches_teachers", 0.031, 0.06) == "fails"  # surely better by more than the margin
    assert decide("student_matches_teachers", -0.04, 0.01) == "unresolved"
    # superiority by the smallest effect worth reporting, 0.01
    for claim in ("student_above_mixed", "mar_quality", "cold_start_merge_vs_sft", "cold_start_merge_vs_none"):
        assert decide(claim, 0.011, 0.05) == "holds"
        assert decide(claim, 0.005, 0.03) == "unresolved"  # above 0, not surely by 0.01
        assert decide(claim, 0.001, 0.009) == "fails"  # above 0, but the data exclude a 0.01 effect
        assert decide(claim, -0.03, -0.02) == "fails"
    assert overall(["holds", "holds"]) == "holds" and overall(["holds", "fails", "unresolved"]) == "fails"
    assert overall(["holds", "unresolved"]) == "unresolved" and overall([]) == "unresolved"
    assert bonferroni_level(7) == pytest.approx(1 - 0.05 / 7) and bonferroni_level(1) == pytest.approx(0.95)


@pytest.fixture
def ledger(tmp_path):
    """Rows built so that each comparison's outcome is known (prompt difficulty shared, per-sample noise 0.02; the
    quality teacher's 0.1, so that its interval is wide)."""
    shifts = {
        "teacher:text": {"text": 0.30},      # student 0.01 below: within 0.03 -> holds
        "teacher:objects": {"objects": 0.30},  # student 0.10 below -> fails
        "teacher:quality": {"quality": 0.26},  # student ~0.035 below (noisier, clipped at 1), on the margin -> unresolved
        "mixed_grpo": {"text": 0.1, "objects": 0.1, "quality": 0.1},
        "flow_opd": {"text": 0.29, "objects": 0.20, "quality": 0.20},
        "flow_opd:sft_init": {"text": 0.29, "objects": 0.20, "quality": 0.20},  # equal to merge: no 0.01 gain -> fails
    }
    db = tmp_path / "ledger.duckdb"
    noise = {"teacher:quality": 0.1}
    ingest([make_shard(tmp_path / str(i), label, samples=scored(shift, seed=i, noise=noise.get(label, 0.02), prompts=48))
            for i, (label, shift) in enumerate(shifts.items())], db)
    return db


def test_claims_decided_from_corrected_paired_intervals(ledger):
    frame = claims(ledger)
    assert csv_frame(frame).columns == CSV_COLUMNS == ["claim", "metric", "estimate", "lo", "hi", "margin", "verdict",
                                                       "n_seeds", "n_prompts"]
    rows = {(r["claim"], r["b"]): r for r in frame.iter_rows(named=True)}
    assert rows[("student_matches_teachers", "teacher:text")]["verdict"] == "holds"
    assert rows[("student_matches_teachers", "teacher:objects")]["verdict"] == "fails"
    assert rows[("student_matches_teachers", "teacher:quality")]["verdict"] == "unresolved"
    mixed = rows[("student_above_mixed", "mixed_grpo")]
    assert mixed["verdict"] == "holds" and mixed["pairing"] == "paired" and mixed["metric"] == "avg"
    assert (mixed["margin"], mixed["n_seeds"], mixed["n_prompts"]) == (EFFECT_MARGIN, 1, 48)
    no_mar = rows[("mar_quality", "flow_opd:no_mar")]
    assert (no_mar["verdict"], no_mar["reason"], no_mar["lo"]) == ("unresolved", "row flow_opd:no_mar missing", None)
    sft = rows[("cold_start_merge_vs_sft", "flow_opd:sft_init")]
    assert sft["verdict"] == "fails" and sft["lo"] < 0 < sft["hi"] < EFFECT_MARGIN  # equal rows: no 0.01 gain
    assert rows[("cold_start_merge_vs_none", "flow_opd:no_cold_start")]["verdict"] == "unresolved"
    assert set(frame["verdict"]) <= {"holds", "fails", "unresolved"}  # reasons stay out of the verdict
    for r in frame.filter(pl.col("lo").is_not_null()).iter_rows(named=True):
        assert r["lo"] < r["estimate"] < r["hi"]
    # quality's normaliser is 5: the comparisons are on the normalised scale
    quality = rows[("student_matches_teachers", "teacher:quality")]
    assert quality["estimate"] == pytest.approx(-0.035, abs=0.005) and quality["lo"] < -0.03 < quality["hi"]
    lines = claim_lines(frame)
    assert lines[0].startswith("Bonferroni, m = 7: each interval is the 99.29% percentile interval")
    assert lines[1].startswith("- `student_matches_teachers`: ") and "**fails**" in lines[1]
    assert "**holds**" in lines[2] and "unresolved (row flow_opd:no_mar missing)" in lines[3]


def test_each_interval_is_the_bonferroni_percentile_interval(ledger):
    results = tables.load(ledger)
    frame = claims_frame(results)
    m = frame.height
    assert m == 7 and frame["level"].drop_nulls().to_list() == pytest.approx([1 - 0.05 / m] * 5)  # two rows missing
    for r in frame.filter(pl.col("lo").is_not_null()).iter_rows(named=True):
        scale = 1.0 if r["metric"] == "avg" else 1 / results.normaliser[r["metric"]]
        draws = results.difference(r["a"], r["b"], r["metric"]).draws * scale
        expected = np.quantile(draws, [0.025 / m, 1 - 0.025 / m])
        assert (r["lo"], r["hi"]) == pytest.approx(tuple(expected), abs=1e-12)
        assert r["hi"] - r["lo"] > np.subtract(*np.quantile(draws, [0.975, 0.025]))  # wider than 95% alone


def test_report_claims_command_prints_the_correction_then_one_line_per_claim(ledger, capsys):
    assert main(["report", "claims", "--db", str(ledger), "--digits", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Bonferroni, m = 7")
    assert [line.split("`")[1] for line in lines[1:]] == ["student_matches_teachers", "student_above_mixed",
                                                          "mar_quality", "cold_start_merge_vs_sft",
                                                          "cold_start_merge_vs_none"]
    assert "`teacher:objects` on objects = −0.09 [−0.10, −0.08] (paired; 1 training seed, 48 distinct prompts): " \
           "fails" in lines[1] and "−margin < lo and hi < margin, margin 0.03: **fails**" in lines[1]


def test_claims_without_rows_or_samples_are_unresolved_never_a_crash(tmp_path):
    db = tmp_path / "ledger.duckdb"
    ingest([make_shard(tmp_path / "a", "flow_opd", values={"text": {"score": [0.5, 0.6]}}),
            make_shard(tmp_path / "b", "mixed_grpo", values={"text": {"score": [0.4, 0.4]}})], db)
    results = tables.load(db)
    results.estimates.clear()  # a ledger without per-sample scores
    frame = claims_frame(results)
    reasons = dict(zip(frame["claim"], frame["reason"]))
    assert set(frame["verdict"]) == {"unresolved"}
    assert reasons["student_matches_teachers"] == "row teacher:text missing"  # the teacher of each task is expected
    assert reasons["student_above_mixed"] == "no per-sample scores for flow_opd"
    assert reasons["mar_quality"] == "row flow_opd:no_mar missing"
    estimate = frame.filter(pl.col("claim") == "student_above_mixed")["estimate"][0]
    assert estimate == pytest.approx(0.15)  # the means are known; only the interval is not

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
    assert decide("student_exceeds_teachers", 0.011, 0.05) == "holds"
    assert decide("student_exceeds_teachers", -0.02, 0.009) == "fails"
    # a drop by at least 0.01: the seesaw and the interference
    for claim in ("seesaw_offtask", "mixed_interference"):
        assert decide(claim, -0.05, -0.011) == "holds"
        assert decide(claim, -0.05, -0.005) == "unresolved"  # below 0, not surely by 0.01
        assert decide(claim, -0.009, -0.001) == "fails"  # below 0, but the data exclude a 0.01 drop
        assert decide(claim, 0.02, 0.05) == "fails"
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
        "flow_opd:reference_update": {"text": 0.30, "objects": 0.20, "quality": 0.20},  # avg +0.0033: within 0.03
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
    reference = rows[("reference_update", "flow_opd")]
    assert (reference["verdict"], reference["margin"], reference["metric"]) == ("holds", 0.03, "avg")
    assert reference["estimate"] == pytest.approx(0.01 / 3, abs=0.002) and -0.03 < reference["lo"] < reference["hi"] < 0.03
    assert set(frame["verdict"]) <= {"holds", "fails", "unresolved"}  # reasons stay out of the verdict
    for r in frame.filter(pl.col("lo").is_not_null()).iter_rows(named=True):
        assert r["lo"] < r["estimate"] < r["hi"]
    # quality's normaliser is 5: the comparisons are on the normalised scale
    quality = rows[("student_matches_teachers", "teacher:quality")]
    assert quality["estimate"] == pytest.approx(-0.035, abs=0.005) and quality["lo"] < -0.03 < quality["hi"]
    lines = claim_lines(frame)
    assert lines[0].startswith("Bonferroni, m = 23: each interval is the 99.78% percentile interval")
    assert lines[1].startswith("- `student_matches_teachers`: ") and "**fails**" in lines[1]
    assert "**holds**" in lines[2] and "unresolved (row flow_opd:no_mar missing)" in lines[3]


def test_each_interval_is_the_bonferroni_percentile_interval(ledger):
    results = tables.load(ledger)
    frame = claims_frame(results)
    m = frame.height
    # 5 of the 7 original rows, the 3 of student_exceeds_teachers and reference_update; no base, matched mix or
    # second training seed
    assert m == 23 and frame["level"].drop_nulls().to_list() == pytest.approx([1 - 0.05 / m] * 9)
    for r in frame.filter(pl.col("lo").is_not_null()).iter_rows(named=True):
        scale = 1.0 if r["metric"] == "avg" else 1 / results.normaliser[r["metric"]]
        draws = results.difference(r["a"], r["b"], r["metric"]).draws * scale
        expected = np.quantile(draws, [0.025 / m, 1 - 0.025 / m])
        assert (r["lo"], r["hi"]) == pytest.approx(tuple(expected), abs=1e-12)
        assert r["hi"] - r["lo"] > np.subtract(*np.quantile(draws, [0.975, 0.025]))  # wider than 95% alone


def test_report_claims_command_prints_the_correction_then_one_line_per_claim(ledger, capsys):
    assert main(["report", "claims", "--db", str(ledger), "--digits", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Bonferroni, m = 23")
    assert [line.split("`")[1] for line in lines[1:]] == ["student_matches_teachers", "student_above_mixed",
                                                          "mar_quality", "cold_start_merge_vs_sft",
                                                          "cold_start_merge_vs_none", "seesaw_offtask",
                                                          "mixed_interference", "student_exceeds_teachers",
                                                          "rescue_all_teachers_fail", "reference_update"]
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


@pytest.fixture
def analysis(tmp_path):
    """Teachers, base, the budget-matched mix and the student with known shifts per task (noise 0.02, 48 prompts)."""
    shifts = {
        "base": {},
        "teacher:text": {"text": 0.2, "objects": -0.1, "quality": 0.05},     # objects: drop -> holds; quality: fails
        "teacher:objects": {"objects": 0.2, "text": -0.01, "quality": -0.1},  # text: on the margin; quality: holds
        "teacher:quality": {"quality": 0.2, "text": -0.1, "objects": -0.1},  # both drops hold
        "mixed_grpo:matched": {"text": 0.1, "objects": 0.19, "quality": 0.25},  # -0.1 holds, -0.01 ?, +0.05 fails
        "flow_opd": {"text": 0.25, "objects": 0.21, "quality": 0.1},  # exceeds: +0.05 holds, +0.01 ?, -0.1 fails
    }
    db = tmp_path / "ledger.duckdb"
    ingest([make_shard(tmp_path / str(i), label, samples=scored(shift, seed=i, noise=0.02, prompts=48))
            for i, (label, shift) in enumerate(shifts.items())], db)
    return db


def test_seesaw_interference_and_exceeding_decided_on_known_shifts(analysis):
    frame = claims(analysis)
    rows = {(r["claim"], r["a"], r["b"], r["metric"]): r for r in frame.iter_rows(named=True)}
    expected = {
        ("seesaw_offtask", "teacher:text", "base", "objects"): (-0.1, "holds"),
        ("seesaw_offtask", "teacher:text", "base", "quality"): (0.05, "fails"),
        ("seesaw_offtask", "teacher:objects", "base", "text"): (-0.01, "unresolved"),
        ("seesaw_offtask", "teacher:objects", "base", "quality"): (-0.1, "holds"),
        ("seesaw_offtask", "teacher:quality", "base", "text"): (-0.1, "holds"),
        ("seesaw_offtask", "teacher:quality", "base", "objects"): (-0.1, "holds"),
        ("mixed_interference", "mixed_grpo:matched", "teacher:text", "text"): (-0.1, "holds"),
        ("mixed_interference", "mixed_grpo:matched", "teacher:objects", "objects"): (-0.01, "unresolved"),
        ("mixed_interference", "mixed_grpo:matched", "teacher:quality", "quality"): (0.05, "fails"),
        ("student_exceeds_teachers", "flow_opd", "teacher:text", "text"): (0.05, "holds"),
        ("student_exceeds_teachers", "flow_opd", "teacher:objects", "objects"): (0.01, "unresolved"),
        ("student_exceeds_teachers", "flow_opd", "teacher:quality", "quality"): (-0.1, "fails"),
    }
    new = frame.filter(pl.col("claim").is_in(["seesaw_offtask", "mixed_interference", "student_exceeds_teachers"]))
    assert new.height == len(expected) and set(expected) <= set(rows)
    for key, (shift, verdict) in expected.items():
        row = rows[key]
        # the shifts on the normalised scale (quality's normaliser 5 divided out); clipping at 1 shaves the top
        assert row["estimate"] == pytest.approx(shift, abs=0.006), key
        assert (row["verdict"], row["margin"], row["pairing"]) == (verdict, EFFECT_MARGIN, "paired"), key
        assert row["lo"] < row["estimate"] < row["hi"]
    # student_exceeds_teachers decides the very comparisons of student_matches_teachers by another rule
    for task in ("text", "objects", "quality"):
        matches = rows[("student_matches_teachers", "flow_opd", f"teacher:{task}", task)]
        exceeds = rows[("student_exceeds_teachers", "flow_opd", f"teacher:{task}", task)]
        assert (matches["estimate"], matches["lo"], matches["hi"]) == (exceeds["estimate"], exceeds["lo"],
                                                                       exceeds["hi"])
    lines = {line.split("`")[1]: line for line in claim_lines(frame)[1:]}
    assert "hi < −margin, margin 0.01: **fails**" in lines["seesaw_offtask"]  # one of six fails
    drop = rows[("seesaw_offtask", "teacher:text", "base", "objects")]
    shown = [f"{drop[c]:+.3f}".replace("-", "−") for c in ("estimate", "lo", "hi")]
    assert (f"`teacher:text` − `base` on objects = {shown[0]} [{shown[1]}, {shown[2]}] (paired; 1 training seed, 48 "
            "distinct prompts): holds") in lines["seesaw_offtask"]
    assert "`mixed_grpo:matched` − `teacher:text` on text" in lines["mixed_interference"]


def test_the_new_rows_join_the_bonferroni_family(analysis):
    results = tables.load(analysis)
    frame = claims_frame(results)
    counts = dict(frame.group_by("claim").len().iter_rows())
    assert counts == {"student_matches_teachers": 3, "student_above_mixed": 1, "mar_quality": 1,
                      "cold_start_merge_vs_sft": 1, "cold_start_merge_vs_none": 1, "seesaw_offtask": 6,
                      "mixed_interference": 3, "student_exceeds_teachers": 3, "rescue_all_teachers_fail": 3,
                      "reference_update": 1}
    m = frame.height
    assert m == 23 and claim_lines(frame)[0].startswith("Bonferroni, m = 23: each interval is the 99.78% ")
    levels = frame["level"].drop_nulls().to_list()
    assert len(levels) == 15 and levels == pytest.approx([1 - 0.05 / 23] * 15)  # the rows with an interval
    seesaw = frame.filter(pl.col("claim") == "seesaw_offtask").row(0, named=True)
    draws = results.difference(seesaw["a"], seesaw["b"], seesaw["metric"]).draws / results.normaliser[seesaw["metric"]]
    assert (seesaw["lo"], seesaw["hi"]) == pytest.approx(tuple(np.quantile(draws, [0.025 / m, 1 - 0.025 / m])),
                                                         abs=1e-12)


def test_an_interval_over_too_few_distinct_prompts_decides_nothing(tmp_path):
    """The text teacher is surely 0.3 above the student, but on 6 distinct prompts: the interval is shown, the verdict
    is unresolved with the reason; the same comparison on 48 prompts fails."""
    from flowopd.results.claims import MIN_PROMPTS

    shifts = {"teacher:text": {"text": 0.30}, "flow_opd": {"text": 0.0}}
    for prompts, verdict in ((6, "unresolved"), (48, "fails")):
        db = tmp_path / f"ledger{prompts}.duckdb"
        ingest([make_shard(tmp_path / f"{prompts}-{i}", label, samples=scored(shift, seed=i, noise=0.02,
                                                                              prompts=prompts))
                for i, (label, shift) in enumerate(shifts.items())], db)
        row = claims(db).filter((pl.col("claim") == "student_matches_teachers") & (pl.col("metric") == "text")).row(
            0, named=True)
        assert row["hi"] < -TEACHER_MARGIN and row["n_prompts"] == prompts and row["verdict"] == verdict
        if prompts < MIN_PROMPTS:
            assert row["reason"] == f"6 distinct test prompts, fewer than the {MIN_PROMPTS} a verdict needs"

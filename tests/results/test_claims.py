"""The paper's claims: holds / fails / unresolved from paired intervals, missing rows named, never a crash."""

import polars as pl
import pytest
from test_ledger import make_shard
from test_report import scored

from flowopd.cli import main
from flowopd.results import tables
from flowopd.results.claims import claim_lines, claims, claims_frame, overall, verdict
from flowopd.results.ledger import ingest


def test_verdict_and_overall():
    assert verdict(0.01, 0.05, 0.0) == "holds" and verdict(-0.05, -0.01, 0.0) == "fails"
    assert verdict(-0.01, 0.01, 0.0) == "unresolved" and verdict(-0.03, 0.01, -0.03) == "unresolved"
    assert overall(["holds", "holds"]) == "holds" and overall(["holds", "fails", "unresolved"]) == "fails"
    assert overall(["holds", "unresolved (row x missing)"]) == "unresolved"
    assert overall(["unresolved (row x missing)"]) == "unresolved (row x missing)"


@pytest.fixture
def ledger(tmp_path):
    """Rows built so that each claim's outcome is known (prompt difficulty shared, per-sample noise 0.02; the quality
    teacher's 0.1, so that its interval is wide)."""
    shifts = {
        "teacher:text": {"text": 0.30},      # student 0.01 below: within 0.03 -> holds
        "teacher:objects": {"objects": 0.30},  # student 0.10 below -> fails
        "teacher:quality": {"quality": 0.26},  # student ~0.035 below (noisier, clipped at 1), on the threshold -> unresolved
        "mixed_grpo": {"text": 0.1, "objects": 0.1, "quality": 0.1},
        "flow_opd": {"text": 0.29, "objects": 0.20, "quality": 0.20},
        "flow_opd:sft_init": {"text": 0.29, "objects": 0.20, "quality": 0.20},  # equal to merge -> unresolved
    }
    db = tmp_path / "ledger.duckdb"
    noise = {"teacher:quality": 0.1}
    ingest([make_shard(tmp_path / str(i), label, samples=scored(shift, seed=i, noise=noise.get(label, 0.02), prompts=48))
            for i, (label, shift) in enumerate(shifts.items())], db)
    return db


def test_claims_decided_from_paired_intervals(ledger):
    frame = claims(ledger)
    assert frame.columns == ["claim", "a", "b", "column", "delta", "lo", "hi", "threshold", "pairing", "verdict"]
    rows = {(r["claim"], r["b"]): r for r in frame.iter_rows(named=True)}
    assert rows[("a", "teacher:text")]["verdict"] == "holds"
    assert rows[("a", "teacher:objects")]["verdict"] == "fails"
    assert rows[("a", "teacher:quality")]["verdict"] == "unresolved"
    assert rows[("b", "mixed_grpo")]["verdict"] == "holds" and rows[("b", "mixed_grpo")]["pairing"] == "paired"
    assert rows[("c", "flow_opd:no_mar")]["verdict"] == "unresolved (row flow_opd:no_mar missing)"
    assert rows[("d", "flow_opd:sft_init")]["verdict"] == "unresolved"
    assert rows[("d", "flow_opd:no_cold_start")]["verdict"] == "unresolved (row flow_opd:no_cold_start missing)"
    for r in frame.filter(pl.col("lo").is_not_null()).iter_rows(named=True):
        assert r["lo"] < r["delta"] < r["hi"]
    # quality's normaliser is 5: claim (a) compares the normalised scores
    quality = rows[("a", "teacher:quality")]
    assert quality["delta"] == pytest.approx(-0.035, abs=0.005) and quality["lo"] < -0.03 < quality["hi"]
    lines = claim_lines(frame)
    assert lines[0].startswith("- (a) ") and "**fails**" in lines[0] and "**holds**" in lines[1]
    assert "**unresolved (row flow_opd:no_mar missing)**" in lines[2]


def test_report_claims_command_prints_one_line_per_claim(ledger, capsys):
    assert main(["report", "claims", "--db", str(ledger), "--digits", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[:6] for line in lines] == ["- (a) ", "- (b) ", "- (c) ", "- (d) "]
    assert "claimed > −0.03: fails" in lines[0]


def test_claims_without_rows_or_samples_are_unresolved_never_a_crash(tmp_path):
    db = tmp_path / "ledger.duckdb"
    ingest([make_shard(tmp_path / "a", "flow_opd", values={"text": {"score": [0.5, 0.6]}}),
            make_shard(tmp_path / "b", "mixed_grpo", values={"text": {"score": [0.4, 0.4]}})], db)
    results = tables.load(db)
    results.estimates.clear()  # a ledger without per-sample scores
    verdicts = dict(zip(claims_frame(results)["claim"], claims_frame(results)["verdict"]))
    assert verdicts["a"] == "unresolved (row teacher:<task> missing)"
    assert verdicts["b"] == "unresolved (no per-sample scores for flow_opd)"
    assert verdicts["c"] == "unresolved (row flow_opd:no_mar missing)"

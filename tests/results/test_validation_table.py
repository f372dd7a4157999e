"""The validation table: evaluations of the val prompts (the sweeps) in reports/validation.csv / .md and a README
section, with estimates and bootstrap intervals computed by hand; test runs never in it; no val runs, no files."""

import pytest
from test_ledger import make_shard
from test_report import read_csv, spread_ledger

from flowopd.cli import main
from flowopd.results import tables
from flowopd.results.ledger import ingest
from flowopd.results.report import build
from flowopd.results.validation_table import TITLE

LATER = "2026-01-01T00:00:00+00:00"  # newer than every test run of the spread ledger
# One training seed, 2 evaluation seeds x 3 distinct prompts per task. Text's prompts average (over the seeds) 0.3,
# 0.5 and 0.7; objects and quality score the same on every prompt (no spread).
TUNED = {"text": {"score": [[0.2, 0.4, 0.9], [0.4, 0.6, 0.5]]},
         "objects": {"strict": [[0.6, 0.6, 0.6], [0.8, 0.8, 0.8]]},
         "quality": {"score": [[4.0, 4.0, 4.0], [3.0, 3.0, 3.0]]}}
OFF = {"text": {"score": [[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]]},
       "objects": {"strict": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]},
       "quality": {"score": [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]}}


def with_val(tmp_path):
    """The spread ledger (seven test rows, flow_opd among them) plus two val runs: sweep:mar=0.1 and flow_opd (the
    test row's label, other scores)."""
    db, shards, out = spread_ledger(tmp_path)
    root = tmp_path / "artifacts/val"
    val = [make_shard(root / "tuned", "sweep:mar=0.1", samples=TUNED, finished=LATER, split="val"),
           make_shard(root / "off", "flow_opd", samples=OFF, finished=LATER, split="val")]
    ingest(val, db)
    return db, shards, val, out


def by_cell(rows):
    return {(r["label"], r["task"]): r for r in rows}


def test_val_rows_make_the_validation_table_with_hand_computed_estimates(tmp_path):
    db, shards, val, out = with_val(tmp_path)
    build([*shards, *val], db, out)
    rows = read_csv(out / "validation.csv")
    assert list(rows[0]) == ["label", "evaluation", "task", "metric", "estimate", "lo", "hi", "n_seeds", "n_prompts"]
    assert [(r["label"], r["task"]) for r in rows] == [(label, task) for label in ("flow_opd", "sweep:mar=0.1")
                                                       for task in ("text", "objects", "quality", "avg")]
    cells = by_cell(rows)
    text = cells["sweep:mar=0.1", "text"]
    assert (text["metric"], text["n_seeds"], text["n_prompts"]) == ("score", "1", "3")
    # mean over prompts and seeds 3.0 / 6; a resample of 3 prompts draws one prompt thrice with probability 1/27
    # each (> 2.5%), so the 95% percentile interval runs from the lowest prompt mean to the highest
    assert [float(text[k]) for k in ("estimate", "lo", "hi")] == pytest.approx([0.5, 0.3, 0.7])
    objects, quality = cells["sweep:mar=0.1", "objects"], cells["sweep:mar=0.1", "quality"]
    assert [float(objects[k]) for k in ("estimate", "lo", "hi")] == pytest.approx([0.7, 0.7, 0.7])
    assert [float(quality[k]) for k in ("estimate", "lo", "hi")] == pytest.approx([3.5, 3.5, 3.5])
    avg = cells["sweep:mar=0.1", "avg"]  # mean over tasks of headline / normaliser (quality's normaliser: 5)
    assert avg["metric"] == "headline/normaliser" and avg["n_prompts"] == "3"
    assert [float(avg[k]) for k in ("estimate", "lo", "hi")] == pytest.approx(
        [(0.5 + 0.7 + 0.7) / 3, (0.3 + 0.7 + 0.7) / 3, (0.7 + 0.7 + 0.7) / 3])
    off = cells["flow_opd", "text"]
    assert [float(off[k]) for k in ("estimate", "lo", "hi")] == pytest.approx([0.2, 0.2, 0.2])
    assert {r["evaluation"] for r in rows} == {"e" * 10}


def test_the_intervals_are_the_main_tables_for_the_same_scores(tmp_path):
    """The same samples as a test row give the same interval: one bootstrap, used the same way."""
    db, shards, val, out = with_val(tmp_path)
    twin = make_shard(tmp_path / "artifacts/eval/twin", "twin", samples=TUNED)
    ingest([twin], db)
    build([*shards, twin, *val], db, out)
    main_row = next(r for r in read_csv(out / "main_table.csv") if r["model"] == "twin")
    cells = by_cell(read_csv(out / "validation.csv"))
    for task in ("text", "objects", "quality", "avg"):
        row = cells["sweep:mar=0.1", task]
        assert [float(row[k]) for k in ("estimate", "lo", "hi")] == pytest.approx(
            [float(main_row[task + s]) for s in ("", "_lo", "_hi")])


def test_test_rows_never_enter_the_validation_table_nor_val_rows_the_others(tmp_path):
    db, shards, val, out = with_val(tmp_path)
    build(shards, db, out)
    before = {name: (out / name).read_text() for name in ("main_table.csv", "claims.csv", "README.md")}
    build([*shards, *val], db, out)
    labels = {r["label"] for r in read_csv(out / "validation.csv")}
    assert labels == {"flow_opd", "sweep:mar=0.1"}  # flow_opd's val run only: its scores, not the test row's
    assert float(by_cell(read_csv(out / "validation.csv"))["flow_opd", "objects"]["estimate"]) == pytest.approx(0.5)
    assert {name: (out / name).read_text() for name in ("main_table.csv", "claims.csv")} == {
        name: before[name] for name in ("main_table.csv", "claims.csv")}
    assert "sweep:mar=0.1" not in (out / "main_table.md").read_text()
    readme = (out / "README.md").read_text()
    section = readme.index(f"## {TITLE}")
    assert readme.index("## Main table") < section < readme.index("## MAR table")
    assert (out / "validation.md").read_text().startswith(f"# {TITLE}\n")
    assert "| sweep:mar=0.1 | `eeeeeeeeee` | text | score | 0.500 [0.300, 0.700] | 1 | 3 |" in readme
    assert tables.main_table(db).equals(tables.main_table(db, shards))  # the latest runs: the test ones


def test_no_val_rows_no_validation_files_and_a_stale_one_is_removed(tmp_path):
    db, shards, val, out = with_val(tmp_path)
    build(shards, db, out)
    assert not (out / "validation.csv").exists() and not (out / "validation.md").exists()
    assert TITLE not in (out / "README.md").read_text() and "validation.md" not in (out / "README.md").read_text()
    args = ["report", "build", "--db", str(db), "--out", str(out)]
    assert main([*args, *map(str, [*shards, *val])]) == 0
    assert (out / "validation.csv").is_file() and (out / "validation.md").is_file()
    assert main([*args, *map(str, shards)]) == 0  # the sweeps are gone: so are their tables
    assert not (out / "validation.csv").exists() and not (out / "validation.md").exists()
    assert TITLE not in (out / "README.md").read_text()

"""The ledger's `budgets` table: filled from a model folder's run record, none for a folder from before budgets,
gained by an old ledger on the next ingest; row_budgets gives each eval run its training totals."""

import json
from pathlib import Path

import duckdb
import pytest
from test_ledger import make_model, make_shard

from flowopd.results.budgets import row_budgets
from flowopd.results.ledger import LedgerError, connect, ingest, shard_run_id
from flowopd.runtime.records import run_record_path

BUDGET = {"images": 960, "forwards": 19200, "optimizer_steps": 30, "cpu_s": 51.5, "lineage": {},
          "total": {"images": 960, "forwards": 19200, "optimizer_steps": 30, "cpu_s": 51.5}}


def model_with(tmp_path, name: str, budget) -> Path:
    """A teacher's model folder whose run record holds `budget` (... : a folder from before run records)."""
    model = make_model(tmp_path / "artifacts" / name, phase="teacher")
    if budget is not ...:
        run_record_path(model).write_text(json.dumps({"phase": "teacher", "budget": budget}))
    return model


def budgets(db) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT images, total_images, total_cpu_s FROM budgets ORDER BY total_images NULLS LAST").fetchall()
    finally:
        con.close()


def test_a_model_budget_is_ingested_and_an_old_folder_gives_no_row(tmp_path):
    counted = make_shard(tmp_path / "eval/a", model="teacher:text", model_dir=model_with(tmp_path, "a", BUDGET))
    old = make_shard(tmp_path / "eval/b", model="teacher:objects", model_dir=model_with(tmp_path, "b", ...))
    unknown = {**BUDGET, "lineage": None, "total": None}  # a parent from before budgets
    partial = make_shard(tmp_path / "eval/c", model="mixed_grpo", model_dir=model_with(tmp_path, "c", unknown))
    db = tmp_path / "ledger.duckdb"
    ingest([counted, old, partial], db)
    assert budgets(db) == [(960, 960, 51.5), (960, None, None)]
    ids = [shard_run_id(s) for s in (counted, old, partial)]
    with connect(db, read_only=True) as con:
        rows = row_budgets(con, ids)
    assert rows.columns == ["run_id", "train_images", "train_forwards", "train_optimizer_steps", "train_cpu_s"]
    assert rows["run_id"].to_list() == ids
    assert rows["train_images"].to_list() == [960, None, None]
    assert rows["train_forwards"].to_list() == [19200, None, None]
    assert rows["train_cpu_s"].to_list() == [51.5, None, None]


def test_an_old_ledger_gains_budgets_on_the_next_ingest(tmp_path):
    shard = make_shard(tmp_path / "eval/a", model_dir=model_with(tmp_path, "a", BUDGET))
    db = tmp_path / "ledger.duckdb"
    ingest([shard], db)
    con = duckdb.connect(str(db))
    con.execute("DROP TABLE budgets")  # a ledger written before the budgets table existed
    con.close()
    with connect(db, read_only=True) as con:  # read as it is, the report's rows have no budget yet
        assert row_budgets(con, [shard_run_id(shard)])["train_images"].to_list() == [None]
    new, known = ingest([shard], db)
    assert new == [] and known == [shard_run_id(shard)] and budgets(db) == [(960, 960, 51.5)]
    ingest([shard], db)
    assert budgets(db) == [(960, 960, 51.5)]  # and only once


@pytest.mark.parametrize("bad", [{"images": 1.5, "forwards": 1, "optimizer_steps": 1, "cpu_s": 1.0, "total": None},
                                 {"images": 1, "forwards": 1, "optimizer_steps": 1, "total": None},
                                 {**BUDGET, "total": 5}, [1, 2]])
def test_a_bad_budget_is_named(tmp_path, bad):
    shard = make_shard(tmp_path / "eval/a", model_dir=model_with(tmp_path, "a", bad))
    with pytest.raises(LedgerError, match=r"a\.run\.json: budget"):
        ingest([shard], tmp_path / "ledger.duckdb")

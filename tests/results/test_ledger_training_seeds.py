"""The ledger's `runs.training_seed`: from each run record, NULL where none is named, added to older ledgers."""

import json

import duckdb
import pytest
from test_ledger import make_model, make_shard, move_provenance_beside

from flowopd.results.ledger import LedgerError, ingest, query, shard_run_id
from flowopd.runtime.records import run_record_path


def seeded_shard(tmp_path, name: str, training_seed):
    """An eval shard of a teacher whose training and evaluation records name `training_seed`."""
    model = make_model(tmp_path / f"artifacts/teacher/{name}", phase="teacher")
    shard = make_shard(tmp_path / f"artifacts/eval/{name}", model="teacher:text", model_dir=model)
    for folder in (model, shard):
        record = move_provenance_beside(folder)
        run_record_path(folder).write_text(json.dumps(record | {"training_seed": training_seed}))
    return shard


def test_each_run_keeps_its_training_seed_and_an_older_ledger_gains_the_column(tmp_path):
    db = tmp_path / "ledger.duckdb"
    old = make_shard(tmp_path / "artifacts/eval/old")  # a shard from before training seeds
    ingest([old], db)
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE runs DROP COLUMN training_seed")  # as a ledger written before the column existed
    con.close()
    shard = seeded_shard(tmp_path, "s2", 2)
    ingest([old, shard], db)
    _, rows = query("SELECT run_id, phase, training_seed FROM runs ORDER BY phase, run_id", db)
    assert {(phase, seed) for _, phase, seed in rows} == {("eval", None), ("eval", 2), ("teacher", 2)}
    seeds = {run_id: seed for run_id, _, seed in rows}
    assert seeds[shard_run_id(old)] is None and seeds[shard_run_id(shard)] == 2


@pytest.mark.parametrize("value", [-1, 1.5, "1", True])
def test_a_training_seed_that_is_no_index_is_named(tmp_path, value):
    shard = seeded_shard(tmp_path, "bad", value)
    with pytest.raises(LedgerError, match=f"training_seed: {value!r} is not a seed index"):
        ingest([shard], tmp_path / "ledger.duckdb")

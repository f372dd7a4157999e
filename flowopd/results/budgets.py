"""What each report row's model cost to train: the ledger's `budgets` totals of the training run an eval run scored.

A row's budget is its own phase plus every phase it descends from (a student: its cold start, its teachers; the base
left out, as it plays the pretrained model every row shares): images generated, transformer forward rows, optimizer
steps and CPU seconds (flowopd.runtime.records.budget). So "student above the mix" can be read beside what each
spent. Nulls where the ledger does not know: a model folder from before budgets, a parent without one, an eval run
whose model folder was gone at ingest, or a ledger from before the `budgets` table.

    with ledger.connect(db, read_only=True) as con:
        budgets.row_budgets(con, eval_run_ids)    # run_id, train_images, train_forwards, ...
"""

from __future__ import annotations

import polars as pl

COLUMNS = {"run_id": pl.String, "train_images": pl.Int64, "train_forwards": pl.Int64,
           "train_optimizer_steps": pl.Int64, "train_cpu_s": pl.Float64}

# Each wanted eval run, its parent training run's totals (the runs row with phase != 'eval' it points to).
ROW_BUDGETS_SQL = """
SELECT w.run_id, b.total_images AS train_images, b.total_forwards AS train_forwards,
       b.total_optimizer_steps AS train_optimizer_steps, b.total_cpu_s AS train_cpu_s
FROM wanted w
LEFT JOIN runs e ON e.run_id = w.run_id AND e.phase = 'eval'
LEFT JOIN runs t ON t.run_id = e.parent_run_id AND t.phase <> 'eval'
LEFT JOIN budgets b ON b.run_id = t.run_id
ORDER BY w.position
"""


def row_budgets(con, eval_run_ids: list[str]) -> pl.DataFrame:
    """One row per eval run id, in the order given: the training totals of the model it evaluated (COLUMNS)."""
    wanted = pl.DataFrame({"run_id": list(eval_run_ids), "position": range(len(eval_run_ids))},
                          schema={"run_id": pl.String, "position": pl.Int64})
    if not _has_table(con, "budgets"):  # a ledger written before budgets, opened read-only
        return wanted.select("run_id").with_columns(
            [pl.lit(None, dtype).alias(name) for name, dtype in COLUMNS.items() if name != "run_id"])
    con.register("wanted", wanted)
    try:
        return con.sql(ROW_BUDGETS_SQL).pl().cast(COLUMNS)
    finally:
        con.unregister("wanted")


def _has_table(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0])

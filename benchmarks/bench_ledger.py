"""Ledger ingest and report-query speed on a synthetic history of eval runs.

Run:  .venv/bin/python benchmarks/bench_ledger.py --runs 10000 --metrics 50 --seeds 3 --files 1000 --prompts 553

1. rows: the rows of `--runs` eval shards (each `--metrics` metrics over 5 benchmarks x `--seeds` seeds, 6 files;
   the 6 latest also 64 per-sample scores per metric and seed) and of 1 training run per 100 eval runs (a 1,000-step
   curve of 3 keys), built as Arrow tables, bulk-inserted into a new ledger in one transaction
   (flowopd.results.ledger.insert); then the same rows again (must add nothing).
2. queries: what the report runs on that ledger: the 6 current runs loaded with their per-sample scores and
   bootstrap intervals (flowopd.results.tables.load_runs) and the main table, and the latest run per model of one spec.
3. files: `--files` shard folders written in the eval phase's format (with samples.jsonl), read and checked
   (flowopd.results.ledger.collect), then inserted: the whole `flowopd ledger ingest` path.
4. intervals: the bootstrap alone (flowopd.results.bootstrap.estimate) for a table of 12 models x 5 benchmarks, at 64
   prompts x `--seeds` seeds (the tiny world) and at `--prompts` prompts (GenEval has 553).
Prints measured seconds and rows (or shards) per second; nothing is extrapolated.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars  # noqa: F401  (imported before the timed report query, as in the report stage)
import pyarrow as pa

from flowopd.results import bootstrap
from flowopd.results.ledger import TABLES, Rows, collect, connect, insert
from flowopd.results.tables import LATEST_SQL, load_runs, training_seed_sql

BENCHMARKS = ("text", "objects", "quality", "counting", "position")
PROMPTS, CURRENT = 64, 6  # per-sample scores: prompts per benchmark, for the latest CURRENT runs


def synthetic_tables(runs: int, metrics: int, seeds: int, rng) -> dict[str, pa.Table]:
    """Arrow tables with the ledger's schema holding `runs` eval runs and their training runs."""
    schema = Rows().arrow()  # empty tables: the exact column types
    eval_ids = np.array([f"{i:016x}" for i in range(runs)], dtype=object)
    train_ids = np.array([f"t{i:015x}" for i in range(max(1, runs // 100))], dtype=object)
    labels = np.array(["base", "teacher:text", "teacher:objects", "mixed_grpo", "flow_opd", "flow_opd:no_mar"])
    per_bench = metrics // len(BENCHMARKS)
    metric_names = [f"{b}/m{j}" for b in BENCHMARKS for j in range(per_bench)]
    n_rows = runs * len(metric_names) * seeds
    # per-sample scores of the CURRENT latest runs; their metrics are these samples' means
    scores = rng.random((CURRENT, len(metric_names), seeds, PROMPTS))
    values = rng.random(n_rows)
    values[-scores[..., 0].size:] = scores.mean(axis=-1).ravel()
    n_samples = scores.size
    finished = np.datetime64("2025-01-01T00:00:00") + rng.integers(0, 10**7, runs).astype("timedelta64[s]")
    columns = {
        "runs": {
            "run_id": np.concatenate([eval_ids, train_ids]),
            "parent_run_id": np.concatenate([train_ids[np.arange(runs) % len(train_ids)], [None] * len(train_ids)]),
            "phase": ["eval"] * runs + ["base"] * len(train_ids),
            "model": np.concatenate([labels[np.arange(runs) % len(labels)], ["base"] * len(train_ids)]),
            "spec_hash": [f"{i % 20:064x}" for i in range(runs + len(train_ids))],
            "spec_name": [f"spec{i % 20}" for i in range(runs + len(train_ids))],
            "finished": np.concatenate([finished, finished[: len(train_ids)]]),
            "seconds": rng.random(runs + len(train_ids)) * 100,
        },
        "benchmarks": {
            "run_id": np.repeat(eval_ids, len(BENCHMARKS)),
            "benchmark": np.tile(np.array(BENCHMARKS, dtype=object), runs),
            "position": np.tile(np.arange(len(BENCHMARKS), dtype=np.int32), runs),
            "headline": np.tile(np.array([f"{b}/m0" for b in BENCHMARKS], dtype=object), runs),
            "normaliser": np.ones(runs * len(BENCHMARKS)),
            "n": np.full(runs * len(BENCHMARKS), 64, dtype=np.int32),
        },
        "metrics": {
            "run_id": np.repeat(eval_ids, len(metric_names) * seeds),
            "benchmark": np.tile(np.repeat(np.array([m.split("/")[0] for m in metric_names], dtype=object), seeds),
                                 runs),
            "metric": np.tile(np.repeat(np.array(metric_names, dtype=object), seeds), runs),
            "seed": np.tile(np.arange(seeds, dtype=np.int32), runs * len(metric_names)),
            "value": values,
            "n": np.full(n_rows, 64, dtype=np.int32),
        },
        "samples": {
            "run_id": np.repeat(eval_ids[-CURRENT:], n_samples // CURRENT),
            "benchmark": np.tile(np.repeat(np.array([m.split("/")[0] for m in metric_names], dtype=object),
                                           seeds * PROMPTS), CURRENT),
            "metric": np.tile(np.repeat(np.array(metric_names, dtype=object), seeds * PROMPTS), CURRENT),
            "seed": np.tile(np.repeat(np.arange(seeds, dtype=np.int32), PROMPTS), CURRENT * len(metric_names)),
            "prompt_index": np.tile(np.arange(PROMPTS, dtype=np.int32), n_samples // PROMPTS),
            "prompt": np.tile(np.array([f"prompt {i}" for i in range(PROMPTS)], dtype=object), n_samples // PROMPTS),
            "value": scores.ravel(),
        },
        "curves": {
            "run_id": np.repeat(train_ids, 3000),
            "step": np.tile(np.repeat(np.arange(1000, dtype=np.int32), 3), len(train_ids)),
            "key": np.tile(np.array(["loss", "reward", "kl"], dtype=object), 1000 * len(train_ids)),
            "value": rng.random(3000 * len(train_ids)),
        },
        "artifacts": {
            "run_id": np.repeat(eval_ids, 6),
            "path": [f"artifacts/eval/{r}/file{j}" for r in eval_ids for j in range(6)],
            "sha256": [f"{i:064x}" for i in range(runs * 6)],
            "bytes": rng.integers(100, 10**6, runs * 6),
            "role": np.tile(np.array(["meta", "spec", "metrics", "samples", "grid", "grid"], dtype=object), runs),
        },
    }
    tables = {}
    for name, empty in schema.items():
        if name not in columns:  # a table this benchmark does not fill (budgets: training runs only)
            tables[name] = empty
            continue
        arrays = [pa.array(columns[name][c], type=empty.schema.field(c).type) if c in columns[name]
                  else pa.nulls(len(next(iter(columns[name].values()))), type=empty.schema.field(c).type)
                  for c in TABLES[name]]
        tables[name] = pa.Table.from_arrays(arrays, schema=empty.schema)
    return tables


def write_shards(root: Path, count: int, metrics: int, seeds: int, rng) -> list[Path]:
    """`count` shard folders in the exact format the eval phase writes (without images)."""
    per_bench = metrics // len(BENCHMARKS)
    spec = {"tasks": {b: {"normaliser": 1.0, "metric": "m0"} for b in BENCHMARKS},
            "evaluation": {"benchmarks": list(BENCHMARKS)}}
    folders = []
    for i in range(count):
        folder = root / f"shard{i:05d}"
        folder.mkdir(parents=True)
        scores = rng.random((len(BENCHMARKS), per_bench, seeds, PROMPTS))
        benchmarks = {b: {"n": PROMPTS, "headline": "m0", "metrics": {
            f"m{j}": {"seeds": {str(s): float(scores[i, j, s].mean()) for s in range(seeds)},
                      "mean": float(scores[i, j].mean(axis=1).mean()), "std": float(scores[i, j].mean(axis=1).std())}
            for j in range(per_bench)}} for i, b in enumerate(BENCHMARKS)}
        (folder / "metrics.json").write_text(json.dumps({"benchmarks": benchmarks, "headline": {}}))
        (folder / "spec.json").write_text(json.dumps(spec))
        meta = {"phase": "eval", "model": "base", "spec_name": "bench", "spec_hash": "b" * 64, "shard": i,
                "started": "2025-01-01T00:00:00+00:00", "finished": "2025-01-01T00:01:00+00:00", "seconds": 60.0,
                "packages": {"torch": "2.13.0"}, "git_rev": "abc", "git_dirty": False}
        (folder / "meta.json").write_text(json.dumps(meta))
        (folder / "samples.jsonl").write_text("".join(
            json.dumps({"benchmark": b, "seed": s, "index": k, "prompt": f"prompt {k}"}
                       | {f"m{j}": float(scores[i, j, s, k]) for j in range(per_bench)}) + "\n"
            for i, b in enumerate(BENCHMARKS) for s in range(seeds) for k in range(PROMPTS)))
        folders.append(folder)
    return folders


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--metrics", type=int, default=50, help="metrics per run (over 5 benchmarks)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000, help="shard folders for the file-ingest timing")
    parser.add_argument("--prompts", type=int, default=553, help="prompts per benchmark for the bootstrap timing")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_ledger."))
    try:
        tables, build_s = timed(lambda: synthetic_tables(args.runs, args.metrics, args.seeds, rng))
        total = sum(t.num_rows for t in tables.values())
        sizes = ", ".join(f"{n} {t.num_rows:,}" for n, t in tables.items())
        print(f"rows: {total:,} ({sizes}); built in {build_s:.2f} s (not part of ingest)")
        db = workdir / "ledger.duckdb"
        with connect(db) as con:
            fresh, ingest_s = timed(lambda: insert(con, tables))
            assert len(fresh) == tables["runs"].num_rows
            print(f"ingest into a new ledger, one transaction: {ingest_s:.2f} s, {total / ingest_s:,.0f} rows/s")
            again, again_s = timed(lambda: insert(con, tables))
            assert again == []
            kept = con.execute("SELECT count(*) FROM metrics").fetchall()[0][0]
            assert kept == tables["metrics"].num_rows, "re-ingest must add nothing"
            print(f"re-ingest of the same rows (adds none): {again_s:.2f} s")
        print(f"ledger file: {db.stat().st_size / 2**20:.1f} MiB")
        with connect(db, read_only=True) as con:
            current = [f"{i:016x}" for i in range(args.runs - CURRENT, args.runs)]  # one run of each label
            table, query_s = timed(lambda: load_runs(con, current).main_table())
            assert table.height == CURRENT and table["avg_lo"].null_count() == 0
            print(f"report query (6 current runs among {args.runs:,}, their samples, bootstrap intervals, main "
                  f"table): {query_s:.3f} s")
            spec = f"{3:064x}"
            query = LATEST_SQL.replace("{seed}", training_seed_sql(con))
            latest, latest_s = timed(lambda: con.execute(query, [spec, spec]).fetchall())
            print(f"compare query (latest run per model of one spec, {len(latest)} rows): {latest_s:.3f} s")
        if args.files:
            folders, write_s = timed(lambda: write_shards(workdir / "shards", args.files, args.metrics, args.seeds,
                                                          rng))
            print(f"wrote {args.files} shard folders in {write_s:.2f} s (not part of ingest)")
            rows, read_s = timed(lambda: collect(folders))
            n_rows = sum(len(cols["run_id"]) for cols in rows.columns.values())
            with connect(workdir / "files.duckdb") as con:
                _, insert_s = timed(lambda: insert(con, rows.arrow()))
            print(f"ingest of {args.files} shard folders: read + check {read_s:.2f} s, insert {insert_s:.2f} s: "
                  f"{args.files / (read_s + insert_s):,.0f} shards/s, {n_rows / (read_s + insert_s):,.0f} rows/s")
        for prompts in (PROMPTS, args.prompts):
            design = lambda b, prompts=prompts: bootstrap.Design(
                b, tuple(f"p{k}" for k in range(prompts)), (1,) * prompts, tuple(range(args.seeds)))
            cells = {(m, b): (design(b), bootstrap.Training((0,)), rng.random((1, prompts)))
                     for m in range(12) for b in BENCHMARKS}
            estimates, boot_s = timed(lambda cells=cells: bootstrap.estimate(cells))
            intervals, quantile_s = timed(lambda found=estimates: [bootstrap.interval(e.draws) for e in found.values()])
            print(f"bootstrap of 12 models x {len(BENCHMARKS)} benchmarks x {prompts} prompts, "
                  f"{bootstrap.RESAMPLES} resamples: draws {boot_s:.3f} s, {len(intervals)} intervals {quantile_s:.3f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

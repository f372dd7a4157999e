"""`flowopd ledger ingest|sql`, and the ledger stage (`python stages/ledger.py --db DB SHARD...`).

A bad ledger or shard is one line on stderr and exit status 1; DuckDB is imported inside the commands. Ingesting
and building the report take one lock, `<ledger>.lock`, so they never run at once: the second waits for the first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowopd.results.formats import format_rows
from flowopd.results.ledger import DEFAULT_DB, LedgerError, ingest, query
from flowopd.runtime.artifacts import exclusive_lock


def ledger_lock(db: Path):
    """The lock the ledger and the report stages share: `<ledger>.lock` beside the ledger file."""
    return exclusive_lock(Path(f"{db}.lock"))


# ---------------------------------------------------------------- flowopd ledger
def cmd_ingest(args) -> int:
    try:
        with ledger_lock(args.db):
            new, known = ingest(args.shards, args.db)
    except LedgerError as err:
        print(err, file=sys.stderr)
        return 1
    except TimeoutError as err:
        print(f"{err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    print(f"{args.db}: {len(new)} new run(s), {len(known)} already ingested")
    return 0


def cmd_sql(args) -> int:
    try:
        columns, rows = query(args.query, args.db)
    except LedgerError as err:
        print(err, file=sys.stderr)
        return 1
    sys.stdout.write(format_rows(columns, rows, args.format))
    return 0


def add_ledger_parser(subparsers) -> argparse.ArgumentParser:
    """Register `ledger ingest|sql` on the `flowopd` subparsers."""
    parser = subparsers.add_parser("ledger", help="ingest eval shards into the DuckDB ledger; query it")
    sub = parser.add_subparsers(dest="ledger_command", required=True, metavar="{ingest,sql}")
    p = sub.add_parser("ingest", help="ingest eval shard folders (idempotent; all or nothing)")
    p.add_argument("shards", nargs="+", metavar="SHARD", help="eval artifact folders (artifacts/eval/...)")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("sql", help="run a query on the ledger (opened read-only) and print the result")
    p.add_argument("query", metavar="SQL", help='e.g. "SELECT model, count(*) FROM runs GROUP BY model"')
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    p.set_defaults(func=cmd_sql)
    return parser


def ledger_stage(argv: list[str] | None = None) -> int:
    """`python stages/ledger.py --db reports/ledger.duckdb SHARD...`, what the DVC stage runs."""
    parser = argparse.ArgumentParser(prog="stages/ledger.py", description="ingest eval shards into the ledger")
    parser.add_argument("shards", nargs="+", metavar="SHARD")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB)
    return cmd_ingest(parser.parse_args(argv))

"""`flowopd report build|compare|table|claims`, and the report stage (`python stages/report.py ...`).

A bad ledger, spec or file is one line on stderr and exit status 1. Polars, DuckDB and matplotlib are imported inside
the commands, so `flowopd --help` stays fast. `build` writes the whole report into a staging folder, then replaces
each output atomically, under the ledger's lock: a failed, killed or concurrent report leaves the previous one whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowopd.results.ledger import DEFAULT_DB, LedgerError
from flowopd.results.ledger_cli import ledger_lock
from flowopd.results.report import DEFAULT_OUT, DIGITS, VALIDATION_FILES, build
from flowopd.runtime.artifacts import replace_path, staging_folder, write_text


# ---------------------------------------------------------------- flowopd report
# ---------------------------------------------------------------- command line
def _one_line(action) -> int:
    """Run `action` (it prints); a bad ledger, spec or file is one line on stderr and exit status 1."""
    from flowopd.spec import SpecError

    try:
        action()
    except (LedgerError, SpecError) as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    return 0


def build_in_place(shards, db: Path, out: Path, quality_benchmark: str):
    """The report written whole into a staging folder beside its outputs, then each output replaced atomically
    (README.md last), all under the ledger's lock; returns the main table. A validation table the new report lacks
    (no val evaluations now) is removed after the README that no longer links it: an old one would pass for current."""
    with ledger_lock(db), staging_folder(Path(out) / "report") as staging:
        table = build(shards, db, staging, quality_benchmark)
        gone = [name for name in VALIDATION_FILES if not (staging / name).exists()]
        for path in sorted(staging.iterdir(), key=lambda p: (p.name == "README.md", p.name)):
            replace_path(path, Path(out) / path.name)
        for name in gone:
            (Path(out) / name).unlink(missing_ok=True)
    return table


def cmd_build(args) -> int:
    def action():
        table = build_in_place(args.shards, args.db, args.out, args.quality_benchmark)
        print(f"{args.out}: main table of {table.height} model(s), plots, grids, README.md")

    return _one_line(action)


def cmd_compare(args) -> int:
    from flowopd.results.compare import compare

    return _one_line(lambda: sys.stdout.write(compare(args.a, args.b, args.db)))


def cmd_claims(args) -> int:
    from flowopd.results.claims import claim_lines, claims

    return _one_line(lambda: print("\n".join(claim_lines(claims(args.db, args.shards), args.digits))))


def table_text(args) -> str:
    """`flowopd report table`: the chosen table, rows and columns in the chosen format."""
    from flowopd.results import formats as render
    from flowopd.results import tables

    if args.against and args.table != "main":
        raise LedgerError("--against applies to the main table only")
    results = tables.load(args.db, args.shards)
    if args.table == "main":
        frame, best = results.main_table(args.rows, args.columns, args.against), "max"
        what = (f"each row minus {args.against} (paired)" if args.against else "headline metric per task and avg")
    else:
        frame = (results.metric_table(args.benchmark, args.rows) if args.table == "mar"
                 else results.exploit_table(args.rows))
        if args.columns:
            unknown = [c for c in args.columns if c not in render.value_columns(frame)]
            if unknown:
                raise LedgerError(f"no column {', '.join(unknown)}; the table has "
                                  f"{', '.join(render.value_columns(frame))}")
            frame = frame.select("model", *(f"{c}{s}" for c in args.columns for s in ("", "_lo", "_hi")))
        best = "min" if args.table == "exploit" else "max"
        what = f"{args.table} table"
    caption = (f"flowopd report table --table {args.table}: {what}; mean over prompts and seeds"
               + (", [95% bootstrap interval]" if not args.no_intervals else "") + "; bold: best per column.")
    return render.render(frame, args.format, args.digits, not args.no_intervals, best, caption)


def cmd_table(args) -> int:
    def action():
        text = table_text(args)
        if args.output is None:
            sys.stdout.write(text)
        else:
            write_text(args.output, text)

    return _one_line(action)


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARD", help="the current eval shard folders")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--quality-benchmark", default="quality",
                        help="the benchmark of the MAR table (the MAR anchor's task; default quality)")


def _runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", nargs="+", metavar="SHARD",
                        help="eval shard folders whose runs to show (default: the latest eval run of every label)")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    parser.add_argument("--digits", type=int, default=DIGITS, help=f"decimals of every number (default {DIGITS})")


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register `report build|compare|table|claims` on the `flowopd` subparsers."""
    from flowopd.results.formats import FORMATS

    parser = subparsers.add_parser("report", help="tables, plots and grids from the ledger; compare two specs")
    sub = parser.add_subparsers(dest="report_command", required=True, metavar="{build,compare,table,claims}")
    p = sub.add_parser("build", help="write the main table, plots, grids and README.md for these eval shards")
    _build_arguments(p)
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("compare", help="spec fields that differ (old -> new) and B - A per metric with its "
                                       "paired 95%% interval")
    p.add_argument("a", metavar="A.yaml")
    p.add_argument("b", metavar="B.yaml")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("table", help="a paper table (LaTeX booktabs, Markdown or CSV) from the ledger")
    p.add_argument("--table", choices=["main", "mar", "exploit"], default="main")
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help="model labels or globs (teacher:*) and spec globs (specs/ablations/*.yaml: each spec's "
                        "label), in this order (default: every model)")
    p.add_argument("--columns", nargs="+", metavar="COLUMN", help="tasks and/or avg, in this order (default: all)")
    p.add_argument("--against", metavar="LABEL", help="main table: each row minus this row, paired intervals")
    p.add_argument("--benchmark", default="quality", help="mar table: the benchmark (default quality)")
    p.add_argument("--format", choices=FORMATS, default="latex")
    p.add_argument("--no-intervals", action="store_true", help="values only")
    p.add_argument("--output", type=Path, help="write here (default: stdout)")
    _runs_arguments(p)
    p.set_defaults(func=cmd_table)
    p = sub.add_parser("claims", help="the paper's claims: holds / fails / unresolved, with intervals")
    _runs_arguments(p)
    p.set_defaults(func=cmd_claims)
    return parser


def report_stage(argv: list[str] | None = None) -> int:
    """`python stages/report.py --db reports/ledger.duckdb --out reports SHARD...`, what the DVC stage runs."""
    parser = argparse.ArgumentParser(prog="stages/report.py", description="write the report of the eval shards")
    _build_arguments(parser)
    return cmd_build(parser.parse_args(argv))

"""Stage `ledger`: run by dvc.yaml as `python stages/ledger.py --db reports/ledger.duckdb SHARD...` (see `--help`)."""

import sys

from flowopd.results.ledger_cli import ledger_stage

if __name__ == "__main__":
    sys.exit(ledger_stage())

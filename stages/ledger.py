"""Stage `ledger`: run by dvc.yaml as `python stages/ledger.py --db reports/ledger.duckdb SHARD...` (see `--help`)."""

import sys

from flowopd.ledger import stage_main

if __name__ == "__main__":
    sys.exit(stage_main())

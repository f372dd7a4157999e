"""Stage `report`: run by dvc.yaml as `python stages/report.py --db reports/ledger.duckdb --out reports SHARD...`."""

import sys

from flowopd.report import stage_main

if __name__ == "__main__":
    sys.exit(stage_main())

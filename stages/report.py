"""Stage `report`: run by dvc.yaml as `python stages/report.py --db reports/ledger.duckdb --out reports SHARD...`."""

import sys

from flowopd.results.report_cli import report_stage

if __name__ == "__main__":
    sys.exit(report_stage())

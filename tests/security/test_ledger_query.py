"""`flowopd ledger sql` and the tables API: a query reads the ledger and nothing else; no file, extension or setting."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "results"))
from test_ledger import make_model, make_shard

from flowopd.cli import main
from flowopd.results import tables
from flowopd.results.ledger import LedgerError, ingest, query


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    """A ledger of one run, a file a query could overwrite, and a secret one outside the repository."""
    model = make_model(tmp_path / "artifacts/base/m")
    db = tmp_path / "reports/ledger.duckdb"
    ingest([make_shard(tmp_path / "artifacts/eval/a", model_dir=model)], db)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/x.py").write_text("print('stage')\n")
    (tmp_path / "secret.txt").write_text("SECRET-LINE\n")
    monkeypatch.chdir(tmp_path)
    return db


def snapshot(root: Path) -> dict:
    """Every file under root and its sha256: what a refused query must leave as it was."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


ATTACKS = {
    "copy_to": ("COPY (SELECT 'pwned') TO 'stages/x.py' (HEADER false)", "file system operations are disabled"),
    "export": ("EXPORT DATABASE 'dump'", "file system operations are disabled"),
    "read_csv": ("SELECT * FROM read_csv('secret.txt')", "file system operations are disabled"),
    "read_text": ("SELECT content FROM read_text('/etc/passwd')", "file system operations are disabled"),
    "glob": ("SELECT * FROM glob('/etc/*')", "file system operations are disabled"),
    "install": ("INSTALL httpfs", "file system operations are disabled"),
    "load": ("LOAD httpfs", "Loading external extensions is disabled"),
    "attach": ("ATTACH 'other.duckdb' AS other", "file system operations are disabled"),
    "set": ("SET enable_external_access = true", "the configuration has been locked"),
    "reset": ("RESET lock_configuration", "the configuration has been locked"),
    "pragma": ("PRAGMA profiling_output = 'stages/x.py'", "the configuration has been locked"),
    "insert": ("INSERT INTO runs (run_id) VALUES ('forged')", "read-only mode"),
    "drop": ("DROP TABLE runs", "read-only mode"),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_ledger_sql_refuses_and_changes_nothing(ledger, capsys, attack):
    sql, message = ATTACKS[attack]
    before = snapshot(ledger.parents[1])
    assert main(["ledger", "sql", sql, "--db", str(ledger)]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and "SECRET" not in captured.out + captured.err
    assert snapshot(ledger.parents[1]) == before  # no file written, changed or added (the ledger included)
    assert query("SELECT count(*) FROM runs", ledger)[1] == [(2,)]


@pytest.mark.parametrize("attack", ["copy_to", "read_csv", "attach", "set"])
def test_the_tables_api_is_confined_like_the_command(ledger, attack):
    sql, message = ATTACKS[attack]
    before = snapshot(ledger.parents[1])
    with pytest.raises(LedgerError, match=message):
        tables.sql(sql, ledger)
    assert snapshot(ledger.parents[1]) == before


def test_a_plain_query_still_works(ledger):
    assert tables.sql("SELECT model FROM runs WHERE phase = 'eval'", ledger)["model"].to_list() == ["base"]

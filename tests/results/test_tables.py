"""The Python API: SQL to Polars, the report's tables as frames (the same numbers as reports/), rows by spec glob,
and `flowopd report table` in every format."""

import runpy
import shutil

import polars as pl
import pytest
from test_ledger import make_shard
from test_report import SPECS, parse_latex, scored, spread_ledger

from flowopd.cli import main
from flowopd.results import formats as render
from flowopd.results import tables
from flowopd.results.ledger import LedgerError, ingest
from flowopd.results.report import build


@pytest.fixture
def spread(tmp_path):
    return spread_ledger(tmp_path)


def test_sql_gives_a_polars_frame_on_a_read_only_ledger(spread):
    db, _, _ = spread
    frame = tables.sql("SELECT model, count(*) AS samples FROM samples JOIN runs USING (run_id) "
                       "WHERE metric = 'score' AND benchmark = 'text' GROUP BY model ORDER BY model", db)
    assert isinstance(frame, pl.DataFrame) and frame.columns == ["model", "samples"]
    assert frame["samples"].to_list() == [24 * 2] * 7  # 24 prompts x 2 seeds per model
    assert tables.sql("SELECT ? + 1 AS x", db, [41])["x"].to_list() == [42]
    with pytest.raises(LedgerError):
        tables.sql("DELETE FROM runs", db)  # read-only
    with pytest.raises(LedgerError, match="no ledger at"):
        tables.sql("SELECT 1", db.parent / "missing.duckdb")


def test_frames_hold_the_numbers_of_the_report_files(spread):
    db, shards, out = spread
    build(shards, db, out)
    frame = tables.main_table(db, shards)
    from_csv = pl.read_csv(out / "main_table.csv")
    assert from_csv.columns == frame.columns and from_csv["model"].to_list() == frame["model"].to_list()
    for column in frame.columns[1:]:
        assert from_csv[column].to_list() == pytest.approx(frame[column].to_list(), abs=5e-7)
    assert render.markdown(frame) in (out / "main_table.md").read_text()
    assert render.latex(frame) in (out / "main_table.tex").read_text()
    assert render.markdown(tables.mar_table(db, shards)) in (out / "mar_table.md").read_text()
    # without shards: the latest eval run of every label, here the same runs
    assert tables.main_table(db).equals(frame)


def test_rows_columns_and_differences(spread, capsys):
    db, _, _ = spread
    frame = tables.main_table(db, rows=["teacher:*", "flow_opd", "nobody"], columns=["avg", "text"])
    assert frame["model"].to_list() == ["teacher:objects", "teacher:quality", "teacher:text", "flow_opd", "nobody"]
    assert frame.columns == ["model", "avg", "avg_lo", "avg_hi", "text", "text_lo", "text_hi"]
    assert frame.row(4) == ("nobody", *[None] * 6)  # asked for, no results: an empty row and a note
    assert "nobody: no results in the ledger" in capsys.readouterr().err
    with pytest.raises(LedgerError, match="no column speed"):
        tables.main_table(db, columns=["speed"])
    full = tables.main_table(db)
    against = tables.main_table(db, rows=["mixed_grpo", "flow_opd:no_mar"], against="flow_opd")
    value = dict(zip(full["model"], full["avg"]))
    assert against["avg"].to_list() == pytest.approx([value["mixed_grpo"] - value["flow_opd"],
                                                      value["flow_opd:no_mar"] - value["flow_opd"]])
    assert all(hi < 0 for hi in against["avg_hi"])  # both below flow_opd, resolved by the paired draws


def test_rows_by_spec_glob_show_each_spec_label(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs/ablations").mkdir(parents=True)
    shutil.copy(SPECS / "flow_opd.yaml", tmp_path / "specs")
    for name, change in (("no_mar", "mar: {weight: 0.0}"), ("sft_init", "cold_start: {method: sft}")):
        (tmp_path / f"specs/ablations/{name}.yaml").write_text(
            f"extends: ../flow_opd.yaml\nname: {name}\nlabel: flow_opd:{name}\n{change}\n")
    db = tmp_path / "ledger.duckdb"
    ingest([make_shard(tmp_path / f"eval/{i}", label, samples=scored({"text": 0.1 * i}, seed=i))
            for i, label in enumerate(["flow_opd", "flow_opd:no_mar", "flow_opd:sft_init", "base"])], db)
    rows = ["specs/flow_opd.yaml", "specs/ablations/*.yaml"]
    assert tables.main_table(db, rows=rows)["model"].to_list() == ["flow_opd", "flow_opd:no_mar", "flow_opd:sft_init"]
    # a new ablation spec is a new row, without a code change (empty until its runs are in the ledger)
    (tmp_path / "specs/ablations/anchor_base.yaml").write_text(
        "extends: ../flow_opd.yaml\nname: anchor_base\nlabel: flow_opd:anchor_base\nmar: {anchor: base}\n")
    frame = tables.main_table(db, rows=rows)
    assert frame["model"].to_list() == ["flow_opd", "flow_opd:anchor_base", "flow_opd:no_mar", "flow_opd:sft_init"]
    assert frame.row(1)[1:] == (None,) * 12 and "flow_opd:anchor_base: no results" in capsys.readouterr().err
    with pytest.raises(LedgerError, match="no spec file matches specs/nothing/"):
        tables.main_table(db, rows=["specs/nothing/*.yaml"])


def test_report_table_command_in_each_format(spread, tmp_path, capsys):
    db, _, _ = spread
    base = ["report", "table", "--db", str(db), "--rows", "flow_opd", "teacher:text", "--columns", "text", "avg"]
    assert main([*base, "--format", "latex", "--output", str(tmp_path / "t.tex")]) == 0
    columns, rows = parse_latex((tmp_path / "t.tex").read_text())
    frame = tables.main_table(db, rows=["flow_opd", "teacher:text"], columns=["text", "avg"])
    assert columns == ["text", "avg"] and list(rows) == ["flow_opd", "teacher:text"]
    for record in frame.iter_rows(named=True):
        assert rows[record["model"]]["avg"][:3] == pytest.approx(
            [round(record[f"avg{s}"], 3) for s in ("", "_lo", "_hi")], abs=1e-12)
    assert main([*base, "--format", "markdown", "--digits", "2", "--no-intervals"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | text | avg |" and lines[2] == f"| flow_opd | {frame['text'][0]:.2f} | " \
                                                             f"**{frame['avg'][0]:.2f}** |"
    assert main([*base, "--format", "csv"]) == 0
    assert pl.read_csv(capsys.readouterr().out.encode())["avg_hi"].to_list() == pytest.approx(
        frame["avg_hi"].to_list(), abs=5e-4)
    assert main(["report", "table", "--db", str(db), "--table", "mar", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| model | score |\n")
    assert main([*base, "--columns", "speed"]) == 1
    assert capsys.readouterr().err.startswith("no column speed")
    # differences against a row: negative numbers are set with a true minus sign and parse back
    assert main(["report", "table", "--db", str(db), "--rows", "mixed_grpo", "--against", "flow_opd", "--columns",
                 "avg", "--output", str(tmp_path / "d.tex")]) == 0
    text = (tmp_path / "d.tex").read_text()
    value, lo, hi, bold = parse_latex(text)[1]["mixed_grpo"]["avg"]
    assert "$-$" in text and lo < value < hi < 0 and not bold
    assert main(["report", "table", "--db", str(db), "--table", "mar", "--against", "flow_opd"]) == 1
    assert capsys.readouterr().err == "--against applies to the main table only\n"


def test_the_docs_python_example_runs(spread, tmp_path, monkeypatch):
    from flowopd.spec import load_spec, spec_hash

    page = (SPECS.parent / "docs/results.md").read_text()
    example = page.split("## Paper tables in Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    db, _, _ = spread  # tmp_path/reports/ledger.duckdb: the default ledger once in tmp_path
    shutil.copytree(SPECS, tmp_path / "specs")
    ingest([make_shard(tmp_path / f"eval/{name}", label, samples=scored({}, seed=9),
                       spec_hash=spec_hash(load_spec(tmp_path / path)))
            for name, label, path in (("a", "flow_opd", "specs/flow_opd.yaml"),
                                      ("b", "flow_opd:no_mar", "specs/ablations/no_mar.yaml"))], db)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.py").write_text(example)
    scope = runpy.run_path(str(tmp_path / "example.py"))
    assert scope["main"].height == 7 and scope["no_mar"]["pairing"].to_list()[-1] == "paired"
    assert set(scope["ablations"]["model"]) >= {"flow_opd", "flow_opd:no_mar", "flow_opd:sft_init"}


def test_samples_that_disagree_with_the_metrics_are_refused_at_ingest(tmp_path):
    shard = make_shard(tmp_path / "eval", "flow_opd", samples=scored({}))
    lines = (shard / "samples.jsonl").read_text().splitlines()
    changed = [line.replace('"score": ', '"score": 0.25, "was": ', 1) if '"benchmark": "text"' in line and i == 0
               else line for i, line in enumerate(lines)]  # one text score changed: no longer the recorded mean
    objects = [i for i, line in enumerate(lines) if '"benchmark": "objects"' in line]
    lost = [line for i, line in enumerate(lines) if i != objects[-1]]  # one objects sample lost
    db = tmp_path / "ledger.duckdb"
    for damaged, message in ((changed, "benchmarks.text.metrics.score.seeds.0 is "),
                             (lost, "benchmarks.objects.metrics.strict.seeds.1: n is 24 prompts, samples.jsonl scores 23")):
        (shard / "samples.jsonl").write_text("\n".join(damaged) + "\n")
        with pytest.raises(LedgerError, match=message):
            ingest([shard], db)
        assert not db.exists()

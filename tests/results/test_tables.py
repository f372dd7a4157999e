"""The Python API: SQL to Polars, the report's tables as frames (the same numbers as reports/), rows by spec glob,
and `flowopd report table` in every format."""

import runpy
import shutil

import numpy as np
import polars as pl
import pytest
from test_ledger import make_shard
from test_report import SPECS, parse_latex, scored, spread_ledger

from flowopd.cli import main
from flowopd.results import formats as render
from flowopd.results import tables
from flowopd.results.ledger import LedgerError, ingest, shard_run_id
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
    assert frame.columns == ["model", "avg", "avg_lo", "avg_hi", "text", "text_lo", "text_hi", "n_seeds", "n_prompts",
                             "train_images", "train_cpu_s"]
    assert frame.row(4) == ("nobody", *[None] * 10)  # asked for, no results: an empty row and a note
    assert frame.row(3)[-4:] == (1, 24, None, None)  # one training seed, 24 distinct prompts per task, no budget
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
    assert frame.row(1)[1:] == (None,) * 16 and "flow_opd:anchor_base: no results" in capsys.readouterr().err
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


# ---------------------------------------------------------------- rows of several training seeds
def set_training_seeds(db, seeds: dict) -> None:
    """Record each shard's training seed (and its training run's) as the ledger's `runs.training_seed`."""
    from flowopd.results.ledger import connect, shard_run_id

    with connect(db) as con:
        con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS training_seed INTEGER")
        for shard, seed in seeds.items():
            run_id = shard_run_id(shard)
            con.execute("UPDATE runs SET training_seed = ? WHERE run_id = ? OR run_id = "
                        "(SELECT parent_run_id FROM runs WHERE run_id = ?)", [seed, run_id, run_id])


def test_a_row_holds_one_model_per_training_seed(tmp_path):
    from test_ledger import make_model

    from flowopd.results.claims import claims_frame

    db, root = tmp_path / "reports/ledger.duckdb", tmp_path / "artifacts"
    offsets = {0: -0.2, 1: 0.0, 2: 0.2}  # three trained students far apart on text
    students = {seed: make_shard(root / f"eval/flow_opd-{seed}", "flow_opd",
                                 samples=scored({"text": 0.1 + off, "objects": 0.2, "quality": 0.2}, seed=seed),
                                 model_dir=make_model(root / f"opd/{seed}", phase="opd"))
                for seed, off in offsets.items()}
    mixed = make_shard(root / "eval/mixed", "mixed_grpo", samples=scored({"text": 0.1}, seed=7))
    base = make_shard(root / "eval/base", "base", samples=scored({}, seed=8))  # no training seed: NULL, seed 0
    shards = [base, mixed, *students.values()]
    ingest(shards, db)
    set_training_seeds(db, {mixed: 0} | {shard: seed for seed, shard in students.items()})

    results = tables.load(db, shards)
    frame = results.main_table()
    row = {r["model"]: r for r in frame.iter_rows(named=True)}
    assert frame["model"].to_list() == ["base", "mixed_grpo", "flow_opd"]  # one row of three models
    per_seed = [np.mean(scored({"text": 0.1 + off}, seed=s)["text"]["score"]) for s, off in offsets.items()]
    assert row["flow_opd"]["text"] == pytest.approx(np.mean(per_seed))  # the mean of the per-seed means
    assert [(row[m]["n_seeds"], row[m]["n_prompts"]) for m in ("base", "mixed_grpo", "flow_opd")] == [
        (1, 24), (1, 24), (3, 24)]
    # the seeds' spread widens the row's interval far beyond a one-model row's of like noise
    spread = {m: row[m]["text_hi"] - row[m]["text_lo"] for m in ("mixed_grpo", "flow_opd")}
    assert spread["flow_opd"] > 2 * spread["mixed_grpo"]
    claims = {r["claim"]: r for r in claims_frame(results).iter_rows(named=True)}
    above = claims["student_above_mixed"]
    assert (above["n_seeds"], above["n_prompts"], above["pairing"]) == (1, 24, "partial")  # same prompts, not seeds

    out = tmp_path / "reports"
    build(shards, db, out)
    main_md = (out / "main_table.md").read_text()
    assert "Training seeds per row: 3: flow_opd; 1: base, mixed_grpo." in main_md
    assert "text: `score` (normaliser 1; 24 distinct prompts in 24 prompt rows; 2 evaluation seeds)" in main_md
    for seed, shard in students.items():  # each model of the row named with its training seed
        assert f"| flow_opd | {seed} | `{shard_run_id(shard)}` |" in main_md
    assert pl.read_csv(out / "main_table.csv")["n_seeds"].to_list() == [1, 1, 3]
    assert (out / "plots/curves_opd.png").is_file() and len(list((out / "grids").glob("flow_opd_*.png"))) == 3


def test_an_old_ledger_without_training_seeds_still_reports(spread):
    from flowopd.results.ledger import connect

    db, shards, out = spread
    before = tables.main_table(db, shards)
    with connect(db) as con:  # the ledger as written before `runs.training_seed` existed
        columns = [c[0] for c in con.execute("SELECT column_name FROM information_schema.columns "
                                             "WHERE table_name = 'runs'").fetchall()]
        con.execute(f"CREATE TABLE old_runs AS SELECT {', '.join(c for c in columns if c != 'training_seed')} "
                    "FROM runs")
        con.execute("DROP TABLE runs")
        con.execute("ALTER TABLE old_runs RENAME TO runs")
    assert "training_seed" not in tables.sql("SELECT * FROM runs LIMIT 0", db).columns
    frame = build(shards, db, out)
    assert frame.equals(before) and set(frame["n_seeds"]) == {1}
    assert "1 training seed (trained model) per row." in (out / "main_table.md").read_text()
    assert (out / "claims.csv").read_text().startswith("claim,metric,estimate,lo,hi,margin,verdict,n_seeds,n_prompts\n")

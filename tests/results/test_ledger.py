"""Ledger: idempotent all-or-nothing ingest of eval shards, bad shards named, a held lock reported, `ledger sql`."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from flowopd.cli import main
from flowopd.results import ledger
from flowopd.results.ledger import LedgerError, ingest, query, shard_run_id
from flowopd.runtime.records import RUN_FACTS, run_record_path

TASKS = {"text": ("score", 1.0), "objects": ("strict", 1.0), "quality": ("score", 5.0)}  # headline, normaliser


def make_model(folder: Path, phase: str = "base", curve: list[dict] | None = None) -> Path:
    """A model folder as a training phase writes it: meta.json, curve.csv, weights."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights of " + folder.name.encode())
    curve = curve or [{"step": s, "loss": 1.0 / (s + 1), "seconds": 0.1 * s} for s in range(5)]
    with open(folder / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
    meta = {"phase": phase, "sections_hash": "s" * 64, "spec_name": "flow_opd", "spec_label": "flow_opd",
            "spec_hash": "h" * 64, "parameters": 1234, "started": "2025-01-01T00:00:00+00:00",
            "finished": "2025-01-01T00:10:00+00:00", "seconds": 600.0, "weights_sha256": "w" * 64,
            "git_rev": "abc", "git_dirty": False, "packages": {"torch": "2.13.0"}, "device": "cpu x2"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def make_shard(folder: Path, model: str = "base", values: dict | None = None, spec_hash: str = "h" * 64,
               finished: str = "2025-01-02T00:00:00+00:00", model_dir: Path | None = None,
               tasks: dict = TASKS, samples: dict | None = None, prompts: int = 4, split: str | None = None) -> Path:
    """An eval shard in the exact format of flowopd.evaluation.benchmark + phases.run_eval.

    values: {task: {metric: [value per seed]}}; default: every metric of every task 0.5 on seeds 0 and 1; each of
    `prompts` prompts scores its seed's value. samples: {task: {metric: [[score per prompt] per seed]}} instead:
    the per-sample scores, whose means are the values. split: the prompt split meta.json and metrics.json name
    (None: none, as a shard from before splits).
    """
    if samples is not None:
        values = {t: {m: [sum(s) / len(s) for s in seeds] for m, seeds in metrics.items()}
                  for t, metrics in samples.items()}
    values = values or {t: {h: [0.5, 0.5]} for t, (h, _) in tasks.items()}
    if samples is None:
        samples = {t: {m: [[v] * prompts for v in seeds] for m, seeds in metrics.items()} for t, metrics in values.items()}
    folder.mkdir(parents=True)
    benchmarks = {}
    for task, metrics in values.items():
        n = len(samples[task][tasks[task][0]][0]) if tasks[task][0] in samples[task] else prompts
        benchmarks[task] = {"n": n, "headline": tasks[task][0], "metrics": {
            metric: {"seeds": {str(i): v for i, v in enumerate(seeds)}, "mean": sum(seeds) / len(seeds), "std": 0.0}
            for metric, seeds in metrics.items()}}
    record = {"benchmarks": benchmarks,
              "headline": {t: b["metrics"][b["headline"]]["mean"] for t, b in benchmarks.items()}}
    record |= {} if split is None else {"split": split}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    spec = {"tasks": {t: {"metric": h, "normaliser": z, "reward": "ocr"} for t, (h, z) in tasks.items()},
            "evaluation": {"benchmarks": list(tasks), "seeds": [0, 1]}, "world": {}}
    (folder / "spec.json").write_text(json.dumps(spec))
    meta = {"phase": "eval", "sections_hash": "e" * 64, "spec_name": "flow_opd", "spec_label": "flow_opd",
            "spec_hash": spec_hash, "model": model, "model_dir": str(model_dir or folder.parent / "no_model"),
            "model_sha256": "w" * 64, "model_sections_hash": "s" * 64, "started": "2025-01-02T00:00:00+00:00",
            "finished": finished, "seconds": 12.5, "git_rev": "abc", "git_dirty": True, "python": "3.11",
            "platform": "linux", "packages": {"torch": "2.13.0"}, "device": "cpu x2"}
    meta |= {} if split is None else {"split": split}
    (folder / "meta.json").write_text(json.dumps(meta))
    rows = {}  # (task, seed, prompt) -> one samples.jsonl row, every metric of that image
    for task, metrics in samples.items():
        for metric, seeds in metrics.items():
            for seed, scores in enumerate(seeds):
                for index, score in enumerate(scores):
                    row = rows.setdefault((task, seed, index), {"benchmark": task, "seed": seed, "index": index,
                                                                "prompt": f"{task} prompt {index}"})
                    row[metric] = score
    (folder / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows.values()))
    for task in values:
        Image.new("RGB", (8, 8), "white").save(folder / f"grid_{task}.png")
    return folder


def counts(db: Path) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ledger.TABLES}
    finally:
        con.close()


@pytest.fixture
def shards(tmp_path):
    model = make_model(tmp_path / "artifacts/base/m1")
    return [make_shard(tmp_path / "artifacts/eval/a", model_dir=model),
            make_shard(tmp_path / "artifacts/eval/b", model="teacher:text", finished="2025-01-03T00:00:00+00:00")]


def test_ingest_writes_every_table_and_is_idempotent(tmp_path, shards, capsys):
    db = tmp_path / "ledger.duckdb"
    new, known = ingest(shards, db)
    assert len(new) == 2 and known == []
    first = counts(db)
    # 2 eval runs + the base's training run; 3 tasks x 1 metric x 2 seeds per eval run; 5 steps x 2 keys
    assert first["runs"] == 3 and first["benchmarks"] == 6 and first["metrics"] == 12 and first["curves"] == 10
    assert first["samples"] == 2 * 3 * 2 * 4  # 2 runs x 3 tasks x 2 seeds x 4 prompts, one metric each
    new, known = ingest([*shards, shards[0]], db)
    assert new == [] and sorted(known) == sorted(shard_run_id(s) for s in shards)
    assert counts(db) == first
    assert "no_model not found" in capsys.readouterr().err  # the second shard's model folder is absent


def test_rows_hold_what_the_shard_says(tmp_path, shards):
    db = tmp_path / "ledger.duckdb"
    ingest(shards, db)
    run_a = shard_run_id(shards[0])
    _, rows = query(f"SELECT model, spec_hash, phase, git_dirty, seconds, json_extract_string(packages, '$.torch'),"
                    f" finished, parent_run_id FROM runs WHERE run_id = '{run_a}'", db)
    model, spec_hash, phase, dirty, seconds, torch, finished, parent = rows[0]
    assert (model, spec_hash, phase, dirty, seconds, torch) == ("base", "h" * 64, "eval", True, 12.5, "2.13.0")
    assert finished.isoformat() == "2025-01-02T00:00:00"
    _, rows = query(f"SELECT phase, model_sha256 FROM runs WHERE run_id = '{parent}'", db)
    assert rows == [("base", "w" * 64)]
    _, rows = query(f"SELECT key, step, value FROM curves WHERE run_id = '{parent}' AND step = 3 ORDER BY key", db)
    assert rows == [("loss", 3, 0.25), ("seconds", 3, pytest.approx(0.3))]
    _, rows = query(f"SELECT benchmark, headline, normaliser, position FROM benchmarks WHERE run_id = '{run_a}' "
                    "ORDER BY position", db)
    assert rows == [("text", "score", 1.0, 0), ("objects", "strict", 1.0, 1), ("quality", "score", 5.0, 2)]
    _, rows = query(f"SELECT role, count(*) FROM artifacts WHERE run_id = '{run_a}' GROUP BY role ORDER BY role", db)
    assert rows == [("grid", 3), ("meta", 1), ("metrics", 1), ("samples", 1), ("spec", 1)]
    _, rows = query(f"SELECT sha256 FROM artifacts WHERE run_id = '{parent}' AND role = 'weights'", db)
    assert rows == [("w" * 64,)]  # recorded by the training phase, not re-hashed


def test_samples_hold_every_scored_image(tmp_path):
    db = tmp_path / "ledger.duckdb"
    shard = make_shard(tmp_path / "s", samples={"text": {"score": [[0.0, 1.0, 0.5], [1.0, 1.0, 0.5]],
                                                         "exact": [[False, True, False], [True, True, False]]}})
    (shard / "samples.jsonl").write_text((shard / "samples.jsonl").read_text().replace(
        '"benchmark"', '"ocr_text": "KO", "benchmark"'))  # a non-metric field: not a sample score
    ingest([shard], db)
    _, rows = query("SELECT benchmark, seed, prompt_index, prompt, metric, value FROM samples "
                    "ORDER BY metric, seed, prompt_index", db)
    assert rows[:3] == [("text", 0, 0, "text prompt 0", "exact", 0.0), ("text", 0, 1, "text prompt 1", "exact", 1.0),
                        ("text", 0, 2, "text prompt 2", "exact", 0.0)]  # flags as 0 / 1
    assert len(rows) == 2 * 2 * 3 and {r[4] for r in rows} == {"exact", "score"}
    _, means = query("SELECT seed, avg(value) FROM samples WHERE metric = 'score' GROUP BY seed ORDER BY seed", db)
    assert means == [(0, 0.5), (1, pytest.approx(2.5 / 3))]


def test_a_ledger_without_samples_gains_them_on_the_next_ingest(tmp_path, shards):
    db = tmp_path / "ledger.duckdb"
    ingest(shards, db)
    before = counts(db)
    con = duckdb.connect(str(db))
    con.execute("DROP TABLE samples")  # a ledger written before the samples table existed
    con.close()
    new, known = ingest(shards, db)
    assert new == [] and len(known) == 2 and counts(db) == before
    assert ingest(shards, db)[0] == [] and counts(db) == before  # and only once


def test_changed_shard_adds_a_run_and_keeps_history(tmp_path, shards):
    db = tmp_path / "ledger.duckdb"
    ingest(shards, db)
    rerun = make_shard(tmp_path / "rerun/a", values={t: {h: [0.7, 0.9]} for t, (h, _) in TASKS.items()})
    new, _ = ingest([rerun], db)
    assert new == [shard_run_id(rerun)] and counts(db)["runs"] == 4


def move_provenance_beside(folder: Path) -> dict:
    """Rewrite a folder as the stages write it now: meta.json keeps what the inputs determine, the run facts go to
    `<folder>.run.json` with the curve's timing column. Returns the run record."""
    meta = json.loads((folder / "meta.json").read_text())
    moved = (*RUN_FACTS, "git_rev", "git_dirty", "python", "platform", "packages", "device")
    run = {key: meta.pop(key) for key in moved if key in meta}
    curve = folder / "curve.csv"
    if curve.exists():
        rows = list(csv.DictReader(curve.read_text().splitlines()))
        run["curve_timing"] = [{"step": int(r["step"]), "seconds": float(r["seconds"])} for r in rows]
        curve.write_text("step,loss\n" + "".join(f"{r['step']},{r['loss']}\n" for r in rows))
    (folder / "meta.json").write_text(json.dumps(meta))
    run_record_path(folder).write_text(json.dumps(run))
    return run


def test_run_provenance_comes_from_the_record_beside_and_a_rerun_is_a_new_run(tmp_path):
    model = make_model(tmp_path / "artifacts/base/m1")
    shard = make_shard(tmp_path / "artifacts/eval/a", model_dir=model)
    run = move_provenance_beside(shard)
    move_provenance_beside(model)
    assert "seconds" not in json.loads((shard / "meta.json").read_text())
    db = tmp_path / "ledger.duckdb"
    (first,), _ = ingest([shard], db)
    _, rows = query(f"SELECT spec_name, seconds, git_dirty, finished, parent_run_id FROM runs WHERE run_id = '{first}'",
                    db)
    name, seconds, dirty, finished, parent = rows[0]
    assert (name, seconds, dirty, finished.isoformat()) == ("flow_opd", 12.5, True, "2025-01-02T00:00:00")
    _, rows = query(f"SELECT key, value FROM curves WHERE run_id = '{parent}' AND step = 3 ORDER BY key", db)
    assert rows == [("loss", 0.25), ("seconds", pytest.approx(0.3))]  # timing back from the run record
    # The same bytes rerun later (a forced `dvc repro`): only the run record changes, and the ledger keeps both.
    run_record_path(shard).write_text(json.dumps(run | {"finished": "2025-02-01T00:00:00+00:00", "seconds": 9.0}))
    (second,), _ = ingest([shard], db)
    assert second != first and second == shard_run_id(shard)
    _, rows = query("SELECT seconds FROM runs WHERE phase = 'eval' ORDER BY finished", db)
    assert rows == [(12.5,), (9.0,)]


def test_a_shard_without_its_run_record_is_named(tmp_path):
    shard = make_shard(tmp_path / "artifacts/eval/a")
    move_provenance_beside(shard)
    run_record_path(shard).unlink()
    with pytest.raises(LedgerError, match=r"a\.run\.json: missing \(the run record names the shard's spec\)"):
        ingest([shard], tmp_path / "ledger.duckdb")


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "metrics.json").write_text("{not json"), "metrics.json: not valid JSON"),
    (lambda s: (s / "metrics.json").unlink(), "missing metrics.json"),
    (lambda s: (s / "meta.json").write_text(json.dumps({"phase": "base"})), "not an eval shard"),
    (lambda s: (s / "spec.json").write_text("[]"), "spec.json: tasks.objects.normaliser: None is not a finite number"),
    (lambda s: (s / "metrics.json").write_text(json.dumps({"benchmarks": {"text": {
        "n": 4, "headline": "score", "metrics": {"score": {"seeds": {"0": "high"}}}}}})),
     "benchmarks.text.metrics.score.seeds.0: 'high' is not a finite number"),
    (lambda s: (s / "samples.jsonl").write_text('{"benchmark": "text", "seed": 7, "index": 0, "prompt": "p"}\n'),
     "samples.jsonl:1: seed 7 is not one of metrics.json's seeds for text"),
    (lambda s: (s / "samples.jsonl").write_text('{"benchmark": "text", "score": 0.5}\n'),
     "samples.jsonl:1: seed None is not one of"),
    (lambda s: (s / "samples.jsonl").write_text('{"benchmark": "text", "seed": 0, "index": 0, "prompt": "p", '
                                                '"score": NaN}\n'), "samples.jsonl:1: score: nan is not a finite"),
    (lambda s: (s / "samples.jsonl").write_text('{"benchmark": "text", "seed": 0, "index": 0, "prompt": "p"}\n' * 2),
     "samples.jsonl:2: a second sample of text prompt 0 seed 0"),
    (lambda s: (s / "samples.jsonl").write_text('{"benchmark": "speed", "seed": 0}\n'),
     "samples.jsonl:1: not a sample of a benchmark in metrics.json"),
    (lambda s: edit_json(s / "meta.json", split="train"), "meta.json: split: 'train' is not one of val, test"),
    (lambda s: edit_json(s / "metrics.json", split="dev"), "metrics.json: split: 'dev' is not one of val, test"),
    (lambda s: (edit_json(s / "meta.json", split="test"), edit_json(s / "metrics.json", split="val")),
     "metrics.json: split 'val' is not meta.json's 'test'"),
])
def test_bad_shard_is_named_and_leaves_the_ledger_unchanged(tmp_path, shards, damage, message):
    db = tmp_path / "ledger.duckdb"
    ingest(shards[:1], db)
    before, stamp = counts(db), db.stat().st_mtime_ns
    damage(shards[1])
    good = make_shard(tmp_path / "artifacts/eval/c", model="mixed_grpo")
    with pytest.raises(LedgerError) as err:
        ingest([good, shards[1]], db)
    assert str(shards[1]) in str(err.value) and message in str(err.value)
    assert counts(db) == before and db.stat().st_mtime_ns == stamp


def test_failed_insert_rolls_back_every_table(tmp_path, shards, monkeypatch):
    db = tmp_path / "ledger.duckdb"
    original = ledger.Rows.arrow

    def broken(self):  # the curves table no longer matches the ledger's column types
        import pyarrow as pa

        tables = original(self)
        tables["curves"] = pa.table({"run_id": tables["curves"]["run_id"],
                                     "step": pa.array(["x"] * tables["curves"].num_rows),
                                     "key": tables["curves"]["key"], "value": tables["curves"]["value"]})
        return tables

    monkeypatch.setattr(ledger.Rows, "arrow", broken)
    with pytest.raises(LedgerError, match="ledger unchanged"):
        ingest(shards, db)
    assert set(counts(db).values()) == {0}


def test_held_lock_gives_one_line_after_bounded_retries(tmp_path, shards, monkeypatch, capsys):
    db = tmp_path / "ledger.duckdb"
    ingest(shards, db)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, sys; c = duckdb.connect({str(db)!r}); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waits = []
        monkeypatch.setattr(ledger.time, "sleep", waits.append)
        with pytest.raises(LedgerError) as err:
            ingest(shards, db, tries=4, delay=0.01)
        assert waits == [0.01, 0.02, 0.04]
        assert f"{db} is in use by another process (PID {holder.pid})" in str(err.value)
        assert "\n" not in str(err.value)
        monkeypatch.setattr(ledger, "LOCK_TRIES", 2)
        capsys.readouterr()
        assert main(["ledger", "sql", "SELECT 1", "--db", str(db)]) == 1
        err = capsys.readouterr().err
        assert "in use by another process" in err and "Traceback" not in err and err.count("\n") == 1
    finally:
        holder.communicate("")
    assert query("SELECT count(*) FROM runs", db)[1] == [(3,)]  # free again once the holder exits


def test_ledger_sql_formats(tmp_path, shards, capsys):
    db = tmp_path / "ledger.duckdb"
    ingest(shards, db)
    sql = "SELECT model, count(*) AS n FROM metrics JOIN runs USING (run_id) GROUP BY model ORDER BY model"
    assert main(["ledger", "sql", sql, "--db", str(db), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "model,n\nbase,6\nteacher:text,6\n"
    assert main(["ledger", "sql", sql, "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"model": "base", "n": 6}, {"model": "teacher:text", "n": 6}]
    assert main(["ledger", "sql", sql, "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "n"] and lines[2].split() == ["base", "6"] and lines[-1] == "(2 rows)"


def test_cli_bad_input_is_one_line_without_traceback(tmp_path, shards, capsys):
    db = tmp_path / "ledger.duckdb"
    assert main(["ledger", "sql", "SELECT 1", "--db", str(db)]) == 1
    assert capsys.readouterr().err.startswith(f"no ledger at {db}")
    assert main(["ledger", "ingest", str(tmp_path / "nowhere"), "--db", str(db)]) == 1
    assert capsys.readouterr().err == f"{tmp_path / 'nowhere'}: no such shard folder\n"
    assert not db.exists()
    ingest(shards, db)
    capsys.readouterr()
    for bad in ("SELEKT 1", "DELETE FROM runs"):  # a syntax error; a write on the read-only connection
        assert main(["ledger", "sql", bad, "--db", str(db)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert counts(db)["runs"] == 3


def test_cli_start_up_imports_neither_duckdb_nor_polars():
    heavy = ["duckdb", "polars", "pyarrow", "matplotlib"]
    code = f"import sys, flowopd.cli; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the prompt split
def test_each_eval_run_keeps_the_split_it_scored_and_an_older_ledger_gains_the_column(tmp_path):
    db = tmp_path / "ledger.duckdb"
    old = make_shard(tmp_path / "artifacts/eval/old", model_dir=make_model(tmp_path / "artifacts/base/m1"))
    ingest([old], db)  # a shard from before splits names none: it scored the test prompts
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE runs DROP COLUMN split")  # as a ledger written before the column existed
    con.close()
    val = make_shard(tmp_path / "artifacts/eval/val", model="teacher:text", split="val")
    test = make_shard(tmp_path / "artifacts/eval/test", model="teacher:objects", split="test")
    ingest([old, val, test], db)
    _, rows = query("SELECT run_id, phase, split FROM runs ORDER BY phase, run_id", db)
    splits = {run_id: split for run_id, _, split in rows}
    assert splits[shard_run_id(val)] == "val" and splits[shard_run_id(test)] == "test"
    assert splits[shard_run_id(old)] is None  # ingested before the column: the report reads NULL as test
    assert [split for _, phase, split in rows if phase != "eval"] == [None]  # a training run scored no split
    fresh = tmp_path / "fresh.duckdb"
    ingest([old], fresh)
    assert query("SELECT split FROM runs WHERE phase = 'eval'", fresh)[1] == [("test",)]

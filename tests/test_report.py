"""Report: main table rows, columns and avg on known numbers; Markdown mean ± std; plots, grids, README; compare."""

import csv
import shutil
from pathlib import Path

import pytest
from test_ledger import make_model, make_shard

from flowopd.cli import main
from flowopd.ledger import ingest, shard_run_id
from flowopd.report import build, flatten, model_order, safe_name, spec_diff
from flowopd.spec import load_spec, spec_hash

SPECS = Path(__file__).parents[1] / "specs"


def tasks_with(text, objects, quality):
    return {"text": {"score": text, "exact": [0.0, 0.0]}, "objects": {"strict": objects, "score": [1.0, 1.0]},
            "quality": {"score": quality}}


@pytest.fixture
def pipeline(tmp_path):
    """A ledger with an old run of `base` (history) and the current shards of six models."""
    db, root = tmp_path / "reports/ledger.duckdb", tmp_path / "artifacts"
    old = make_shard(root / "old/base", values=tasks_with([0.9, 0.9], [0.9, 0.9], [4.5, 4.5]))
    ingest([old], db)
    model = make_model(root / "base/m", curve=[{"step": s, "loss": 1.0 / (s + 1), "seconds": s} for s in range(60)])
    current = [
        make_shard(root / "eval/fo_nomar", "flow_opd:no_mar", tasks_with([0.6, 0.6], [0.6, 0.6], [3.0, 3.0])),
        make_shard(root / "eval/base", "base", tasks_with([0.2, 0.4], [0.5, 0.5], [2.0, 3.0]), model_dir=model),
        make_shard(root / "eval/tt", "teacher:text", tasks_with([0.9, 1.0], [0.1, 0.3], [1.0, 1.0])),
        make_shard(root / "eval/fo", "flow_opd", tasks_with([0.8, 0.8], [0.7, 0.7], [4.0, 4.0])),
        make_shard(root / "eval/mixed", "mixed_grpo", {"text": {"score": [0.5, 0.5]}}),  # one task only
        make_shard(root / "eval/to", "teacher:objects", tasks_with([0.1, 0.1], [0.9, 0.9], [1.0, 1.0])),
    ]
    ingest(current, db)
    return db, current, tmp_path / "reports"


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_model_order_and_file_names():
    labels = ["zeta", "flow_opd:no_mar", "teacher:text", "flow_opd", "base", "mixed_grpo", "teacher:objects"]
    assert sorted(labels, key=model_order) == ["base", "teacher:objects", "teacher:text", "mixed_grpo", "flow_opd",
                                               "flow_opd:no_mar", "zeta"]
    assert safe_name("teacher:text") == "teacher-text" and safe_name("flow_opd:no mar/x") == "flow_opd-no-mar-x"


def test_main_table_rows_columns_and_avg(pipeline):
    db, current, out = pipeline
    build(current, db, out)
    rows = read_csv(out / "main_table.csv")
    assert list(rows[0]) == ["model", "text", "objects", "quality", "avg"]
    assert [r["model"] for r in rows] == ["base", "teacher:objects", "teacher:text", "mixed_grpo", "flow_opd",
                                          "flow_opd:no_mar"]
    base = {k: float(v) for k, v in rows[0].items() if k != "model"}  # current base run, not the old 0.9 one
    assert base == pytest.approx({"text": 0.3, "objects": 0.5, "quality": 2.5, "avg": (0.3 + 0.5 + 2.5 / 5) / 3})
    flow_opd = rows[4]
    assert float(flow_opd["avg"]) == pytest.approx((0.8 + 0.7 + 4.0 / 5) / 3)
    mixed = rows[3]
    assert float(mixed["text"]) == 0.5 and mixed["objects"] == mixed["quality"] == mixed["avg"] == ""


def test_markdown_shows_mean_pm_std_and_explains_avg(pipeline):
    db, current, out = pipeline
    build(current, db, out)
    text = (out / "main_table.md").read_text()
    base_row = next(line for line in text.splitlines() if line.startswith("| base |"))
    # per-seed avg: seed 0 (0.2 + 0.5 + 0.4) / 3, seed 1 (0.4 + 0.5 + 0.6) / 3: std 1/15
    assert base_row == "| base | 0.300 ± 0.100 | 0.500 ± 0.000 | 2.500 ± 0.500 | 0.433 ± 0.067 |"
    assert "| mixed_grpo | 0.500 ± 0.000 | – | – | – |" in text
    assert "avg` = mean over tasks of headline / normaliser" in text and "quality: `score` (normaliser 5" in text
    assert shard_run_id(current[1]) in text


def test_plots_grids_and_readme(pipeline):
    db, current, out = pipeline
    (out / "grids").mkdir(parents=True)
    (out / "grids/stale_text.png").write_bytes(b"old")
    build(current, db, out)
    assert {p.name for p in (out / "plots").iterdir()} == {"tasks.png", "curves_base.png"}
    assert (out / "plots/tasks.png").read_bytes()[:4] == b"\x89PNG"
    grids = {p.name for p in (out / "grids").iterdir()}
    assert "teacher-text_objects.png" in grids and "flow_opd-no_mar_quality.png" in grids
    assert "stale_text.png" not in grids and len(grids) == 5 * 3 + 1
    readme = (out / "README.md").read_text()
    for target in ["main_table.md", "main_table.csv", "plots/tasks.png", "plots/curves_base.png",
                   *(f"grids/{g}" for g in grids)]:
        assert f"]({target})" in readme


def test_mar_table_lists_every_quality_metric_per_model(pipeline):
    db, current, out = pipeline
    build(current, db, out)
    lines = (out / "mar_table.md").read_text().splitlines()
    assert lines[2] == "| model | score |"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| model")]
    assert rows == ["| base | 2.500 |", "| teacher:objects | 1.000 |", "| teacher:text | 1.000 |",
                    "| flow_opd | 4.000 |", "| flow_opd:no_mar | 3.000 |"]  # mixed_grpo has no quality benchmark
    assert "## MAR table" in (out / "README.md").read_text()


def test_build_refuses_shards_missing_from_the_ledger(pipeline, tmp_path, capsys):
    db, current, out = pipeline
    late = make_shard(tmp_path / "artifacts/eval/late", "flow_opd:late")
    assert main(["report", "build", *map(str, current), str(late), "--db", str(db), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"not in the ledger {db}, ingest first: {late} (run {shard_run_id(late)})\n"
    assert not (out / "main_table.csv").exists()


def test_spec_diff_lists_only_differing_leaves():
    a = {"mar": {"weight": 0.02, "anchor": "quality"}, "seeds": [0, 1, 2], "rules": [{"task": "t", "teacher": "x"}]}
    b = {"mar": {"weight": 0.0, "anchor": "quality"}, "seeds": [0, 1], "rules": [{"task": "t", "teacher": "y"}],
         "new": 1}
    assert flatten(a)["rules.0.teacher"] == "x" and flatten(a)["seeds"] == [0, 1, 2]
    assert [(p, o, n) for p, o, n in spec_diff(a, b) if p != "new"] == [
        ("mar.weight", 0.02, 0.0), ("seeds", [0, 1, 2], [0, 1]), ("rules.0.teacher", "x", "y")]
    assert [p for p, _, _ in spec_diff(a, b)] == ["mar.weight", "seeds", "rules.0.teacher", "new"]


@pytest.fixture
def two_specs(tmp_path):
    shutil.copy(SPECS / "flow_opd.yaml", tmp_path / "a.yaml")
    shutil.copy(SPECS / "schema.json", tmp_path / "schema.json")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: no_mar\nlabel: flow_opd:no_mar\nmar: {weight: 0.0}\n")
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


def test_compare_shows_differing_fields_and_metric_deltas(tmp_path, two_specs, capsys):
    a, b = two_specs
    hash_a, hash_b = spec_hash(load_spec(a)), spec_hash(load_spec(b))
    db, root = tmp_path / "ledger.duckdb", tmp_path / "eval"
    ingest([make_shard(root / "base", "base", tasks_with([0.2, 0.4], [0.5, 0.5], [2.0, 3.0]), spec_hash=hash_a),
            make_shard(root / "fo_old", "flow_opd", tasks_with([0.1, 0.1], [0.1, 0.1], [1.0, 1.0]), spec_hash=hash_a,
                       finished="2025-01-01T00:00:00+00:00"),
            make_shard(root / "fo", "flow_opd", tasks_with([0.8, 0.8], [0.7, 0.7], [4.0, 4.0]), spec_hash=hash_a)], db)
    assert main(["report", "compare", str(a), str(b), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    fields = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert fields == ['name: "flow_opd" -> "no_mar"', 'label: "flow_opd" -> "flow_opd:no_mar"', "mar.weight: 0.02 -> 0.0"]
    assert f"no results yet for B = {b}" in out

    ingest([make_shard(root / "nomar", "flow_opd:no_mar", tasks_with([0.6, 0.6], [0.6, 0.6], [3.0, 3.0]),
                       spec_hash=hash_b)], db)
    assert main(["report", "compare", str(a), str(b), "--db", str(db)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    deltas = {(r[0], r[2], r[3]): r[4:] for r in rows if len(r) == 7 and r[1] == "->"}
    assert deltas[("flow_opd", "flow_opd:no_mar", "text")] == ["0.8", "0.6", "-0.2"]  # the latest flow_opd run
    assert deltas[("flow_opd", "flow_opd:no_mar", "avg")][2] == f"{(0.6 + 0.6 + 0.6) / 3 - (0.8 + 0.7 + 0.8) / 3:.6g}"
    assert ["base", "->", "-", "text", "0.3"] in rows  # only A has a base row


def test_compare_bad_spec_is_one_line(tmp_path, two_specs, capsys):
    a, _ = two_specs
    (tmp_path / "bad.yaml").write_text("extends: a.yaml\nmar: {weight: -1}\n")
    assert main(["report", "compare", str(a), str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert "mar.weight" in err and "Traceback" not in err
    assert main(["report", "compare", str(a), str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err

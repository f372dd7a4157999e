"""Phases end to end on a micro spec: data -> base -> eval, bit-identical on CPU for the same spec and seed."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from flowopd.phases import data as data_phase
from flowopd.phases.base import run_base
from flowopd.phases.data import run_data
from flowopd.phases.eval import run_eval
from flowopd.phases.keys import sub_spec_hash
from flowopd.runtime.records import read_run_record
from flowopd.spec import load_spec, spec_hash

MICRO = Path(__file__).parents[1] / "data" / "micro.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_spec(MICRO)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, spec):
    """The phases twice, each in its own folder with the same relative paths (paths are stage inputs, as in DVC)."""
    runs, here = [], os.getcwd()
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(name)
        os.chdir(root)
        try:
            run_data(spec, Path("data"))
            run_base(spec, Path("base"), progress=False)
            run_eval(spec, Path("base"), Path("data"), "base", Path("eval"), Path("metrics.json"), progress=False)
        finally:
            os.chdir(here)
        runs.append(root)
    return runs


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_spec_and_seed_give_bit_identical_folders(two_runs):
    """Every file DVC hashes (weights, meta.json, spec.json, curve, metrics, samples, PNG grids) is a function of
    the inputs; only the run records beside the folders differ."""
    a, b = two_runs
    for phase in ("data", "base", "eval"):
        files = folder_bytes(a / phase)
        assert {"meta.json", "spec.json"} <= files.keys()
        assert files == folder_bytes(b / phase), phase
        assert read_run_record(a / phase)["finished"] != read_run_record(b / phase)["finished"]
    assert {"grid_text.png", "curve.csv", "model.safetensors"} <= folder_bytes(a / "eval").keys() | folder_bytes(
        a / "base").keys()


def test_eval_writes_metrics_samples_grids_and_provenance(two_runs, spec):
    root = two_runs[0]
    record = json.loads((root / "eval/metrics.json").read_text())
    assert set(record["headline"]) == {"text", "objects", "quality"}
    objects = record["benchmarks"]["objects"]
    assert objects["headline"] == "strict" and objects["n"] == 4
    assert set(objects["metrics"]["strict"]["seeds"]) == {"0", "1"}
    assert np.isclose(objects["metrics"]["strict"]["mean"], np.mean(list(objects["metrics"]["strict"]["seeds"].values())))
    rows = [json.loads(line) for line in (root / "eval/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 * 2  # tasks x prompts x seeds
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert {p.name for p in (root / "eval").glob("grid_*.png")} == {"grid_text.png", "grid_objects.png", "grid_quality.png"}
    # DVC's metrics: keyed by what they measure (every model's file has the same keys), the model named inside
    dvc = json.loads((root / "metrics.json").read_text())
    assert dvc == {"model": "base", **record["headline"], "avg": pytest.approx(np.mean(list(record["headline"].values())))}
    meta = json.loads((root / "base/meta.json").read_text())
    assert meta["sections_hash"] == sub_spec_hash(spec, "base")
    run = read_run_record(root / "base")
    assert run["spec_hash"] == spec_hash(spec) and run["spec_name"] == "micro"
    eval_meta = json.loads((root / "eval/meta.json").read_text())
    assert eval_meta["model_sha256"] == meta["weights_sha256"] and eval_meta["model"] == "base"
    assert eval_meta["split"] == record["split"] == "test"  # the ledger keeps it; the report reads only test runs
    assert json.loads((root / "base/spec.json").read_text())["base"]["steps"] == 4
    assert run["packages"]["torch"].startswith("2.13") and run["seconds"] > 0
    assert [row["step"] for row in run["curve_timing"]] == list(range(4))  # the loss curve's seconds column


def test_stage_refuses_a_bad_spec_with_one_line_per_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {MICRO}\nbase: {{steps: -1}}\n")
    with pytest.raises(SystemExit) as exit_info:
        data_phase.main(["--spec", str(bad), "--out", str(tmp_path / "out")])
    assert "base.steps" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_eval_shard_feeds_the_ledger_samples_and_the_report_intervals(two_runs, tmp_path):
    from flowopd.results import tables
    from flowopd.results.ledger import ingest

    shard = two_runs[0] / "eval"
    record = json.loads((shard / "metrics.json").read_text())
    db = tmp_path / "ledger.duckdb"
    ingest([shard], db)
    samples = tables.sql("SELECT benchmark, metric, seed, avg(value) AS mean, count(*) AS n FROM samples "
                         "GROUP BY ALL ORDER BY ALL", db)
    assert set(samples["n"]) == {4}  # every prompt of every benchmark, metric and seed
    for benchmark, metric, seed, mean, _ in samples.iter_rows():  # each seed's metric is its samples' mean
        assert mean == pytest.approx(record["benchmarks"][benchmark]["metrics"][metric]["seeds"][str(seed)])
    row = tables.main_table(db, [shard]).row(0, named=True)
    for task in ("text", "objects", "quality", "avg"):
        assert row[f"{task}_lo"] <= row[task] <= row[f"{task}_hi"]

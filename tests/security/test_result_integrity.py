"""Results that cannot be silently wrong: the ledger refuses a shard that is not what it claims (weights, metrics,
samples), and a report row is a model under one evaluation setting, never replaced by another spec's run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "results"))
from test_ledger import counts, make_model, make_shard
from test_report import SPREAD, scored

from flowopd.results.ledger import LedgerError, ingest
from flowopd.results.report import build, safe_name


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def batch(tmp_path):
    """A good shard and a teacher's shard whose model folder records its weights' sha256, and a ledger of neither."""
    teacher = make_model(tmp_path / "artifacts/teacher/t", phase="teacher")
    good = make_shard(tmp_path / "artifacts/eval/base")
    shard = make_shard(tmp_path / "artifacts/eval/teacher", "teacher:text", model_dir=teacher)
    return tmp_path / "reports/ledger.duckdb", good, shard


def refused(db: Path, shards: list[Path], message: str) -> None:
    """Ingest refuses the batch naming the problem, and the ledger stays as it was (here: never created)."""
    with pytest.raises(LedgerError) as error:
        ingest(shards, db)
    assert message in str(error.value), str(error.value)
    assert not db.exists()


def test_weights_other_than_the_trained_ones_are_refused(batch):
    db, good, shard = batch  # the evaluation hashed weights with flipped sign bits: not what training recorded
    edit_json(shard / "meta.json", lambda meta: meta.update(model_sha256="f" * 64))
    refused(db, [good, shard], f"{shard}/meta.json: model_sha256 {'f' * 64} is not the weights_sha256 {'w' * 64} "
                               f"of {shard.parent.parent / 'teacher/t'}/meta.json")


def test_weights_other_than_the_recorded_ones_at_evaluation_are_refused(batch):
    db, good, shard = batch
    edit_json(shard / "meta.json", lambda meta: meta.update(model_recorded_sha256="0" * 64))
    refused(db, [good, shard], f"model_sha256 {'w' * 64} is not model_recorded_sha256 {'0' * 64}")


def test_an_edited_metric_is_refused_with_both_values(batch):
    db, good, shard = batch
    edit_json(good / "metrics.json", lambda m: m["benchmarks"]["text"]["metrics"]["score"]["seeds"].update({"0": 0.99}))
    refused(db, [good, shard], f"{good}/metrics.json: benchmarks.text.metrics.score.seeds.0 is 0.99, its 4 scores in "
                               "samples.jsonl average 0.5")


def test_an_edited_mean_is_refused(batch):
    db, good, shard = batch
    edit_json(good / "metrics.json", lambda m: m["benchmarks"]["text"]["metrics"]["score"].update(mean=0.99))
    refused(db, [good, shard], "benchmarks.text.metrics.score.mean is 0.99, its seeds average 0.5")


def test_a_deleted_samples_file_is_refused(batch):
    db, good, shard = batch
    (good / "samples.jsonl").unlink()
    refused(db, [good, shard], f"{good}: missing samples.jsonl")


def test_a_bad_shard_leaves_an_existing_ledger_unchanged(batch):
    db, good, shard = batch
    ingest([good], db)
    before = counts(db)
    edit_json(shard / "meta.json", lambda meta: meta.update(model_sha256="f" * 64))
    with pytest.raises(LedgerError, match="not the model its lineage records"):
        ingest([shard], db)
    assert counts(db) == before


# ---------------------------------------------------------------- report rows
def shard_of(root: Path, i: int, label: str, evaluation: str = "e", spec: str = "flow_opd", lineage: str = "s",
             prompts: int = 24) -> Path:
    """An eval shard of `label`'s model (lineage) under an evaluation setting, from `spec`, finished in order i."""
    shift = SPREAD.get(label, SPREAD["flow_opd"])
    shard = make_shard(root / f"{safe_name(label)}-{evaluation}-{spec}", label,
                       samples=scored(shift, prompts=prompts, seed=i), finished=f"2025-01-{i + 1:02d}T00:00:00+00:00")
    edit_json(shard / "meta.json", lambda meta: meta.update(
        sections_hash=evaluation * 64, spec_name=spec, model_sections_hash=(lineage + label) * 4))
    return shard


def test_an_ablation_of_evaluation_adds_its_own_rows(tmp_path):
    root, db = tmp_path / "artifacts/eval", tmp_path / "reports/ledger.duckdb"
    main_shards = [shard_of(root, i, label) for i, label in enumerate(SPREAD)]
    ingest(main_shards, db)
    alone = build(main_shards, db, tmp_path / "alone")
    # later runs of the same models on 8 prompts, from a spec that changes only `evaluation`
    ablation = [shard_of(root, 10 + i, label, "f", "eval8", prompts=8) for i, label in enumerate(SPREAD)]
    ingest(ablation, db)
    out = tmp_path / "reports"
    frame = build(main_shards + ablation, db, out)
    assert frame.equals(alone)  # the main table keeps the main setting's rows
    main_md, readme = (out / "main_table.md").read_text(), (out / "README.md").read_text()
    assert main_md == (tmp_path / "alone/main_table.md").read_text()
    claims = readme.split("## The paper's claims", 1)[1].split("Sample grids", 1)[0]
    assert claims == (tmp_path / "alone/README.md").read_text().split("## The paper's claims", 1)[1].split(
        "Sample grids", 1)[0]
    other = readme.split("## Other evaluation settings", 1)[1]
    assert f"`{'f' * 10}`" in other and all(f"`{shard}`" in other for shard in ablation)
    assert all(f"`{shard}`" in main_md for shard in main_shards)  # each row names the run it comes from


def test_one_label_from_two_specs_is_refused(tmp_path):
    root, db, out = tmp_path / "artifacts/eval", tmp_path / "reports/ledger.duckdb", tmp_path / "reports"
    shards = [shard_of(root, 0, "base"), shard_of(root, 1, "flow_opd"),
              shard_of(root, 2, "flow_opd", spec="other", lineage="t")]  # another spec's model, the same label
    ingest(shards, db)
    with pytest.raises(LedgerError) as error:
        build(shards, db, out)
    assert str(error.value) == (f"two models labelled 'flow_opd' under one evaluation: spec flow_opd ({shards[1]}) "
                                f"and spec other ({shards[2]}); give each its own label")
    assert sorted(p.name for p in out.iterdir()) == ["ledger.duckdb"]  # no report written


def test_a_twin_spec_under_a_new_label_keeps_its_row(tmp_path):
    root, db = tmp_path / "artifacts/eval", tmp_path / "reports/ledger.duckdb"
    shards = [shard_of(root, 0, "base"), shard_of(root, 1, "flow_opd"), shard_of(root, 2, "flow_opd:twin")]
    edit_json(shards[2] / "meta.json", lambda meta: meta.update(model_sections_hash="sflow_opd" * 4))  # flow_opd's model
    ingest(shards, db)
    assert build(shards, db, tmp_path / "reports")["model"].to_list() == ["base", "flow_opd", "flow_opd:twin"]

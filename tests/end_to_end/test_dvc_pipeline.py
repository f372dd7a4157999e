"""`dvc repro` on micro specs in a scratch repository: what reruns after an edit, and what two specs share."""

import json
import shutil

import pytest
from dvc_repo import MICRO, ran, run, scratch_repo

from flowopd.pipeline import dvc as pipeline

TRAINING = {"teacher", "baseline", "cold_start", "opd"}
# Minutes of `dvc repro` (each stage process imports torch and diffusers): behind the slow marker.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")]


def repro(tree) -> set[str]:
    """Write dvc.yaml from the specs, run `dvc repro`, return the names of the stages that ran."""
    pipeline.write(tree)
    stages = ran(run(tree, "dvc", "repro").stdout)
    assert "up to date" in run(tree, "dvc", "status").stdout
    return stages


def phases(stages: set[str]) -> set[str]:
    return {name.split("-")[0] for name in stages}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return scratch_repo(tmp_path_factory.mktemp("repo"), {"micro.yaml": MICRO})


def test_dvc_repro_reruns_only_what_an_edit_changes(tree):
    assert phases(repro(tree)) == {"data", "base", *TRAINING, "eval", "ledger", "report"}
    records = [json.loads(path.read_text()) for path in (tree / "artifacts").glob("*/*.run.json")]
    # every model stage paused the collector for its imports and resumed it after the model library's import
    assert {r["phase"] for r in records if r.get("import_seconds", 0) > 0} == {"base", *TRAINING, "eval"}
    assert repro(tree) == set()  # a no-op
    mtimes = {p: p.stat().st_mtime_ns for p in (tree / "artifacts").glob("*/*/meta.json")}

    # Evaluation edit: eval, ledger and report rerun; data and every model artifact untouched.
    spec = tree / "specs/micro.yaml"
    spec.write_text(spec.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    assert phases(repro(tree)) == {"eval", "ledger", "report"}
    for path, mtime in mtimes.items():
        if "/eval/" not in str(path):
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"

    # Base edit: base and everything downstream rerun; data does not.
    spec.write_text(spec.read_text().replace("base: {steps: 4,", "base: {steps: 5,"))
    assert phases(repro(tree)) == {"base", *TRAINING, "eval", "ledger", "report"}

    # A second spec with the same training sections shares every model: only its own evals (and the ledger) run.
    (tree / "specs/micro_twin.yaml").write_text(
        spec.read_text().replace("name: micro", "name: micro_twin").replace("label: micro", "label: micro_twin")
        .replace("seeds: [0]", "seeds: [1]"))
    assert phases(repro(tree)) == {"eval", "ledger", "report"}
    header, *rows = (tree / "reports/main_table.csv").read_text().splitlines()
    assert header.split(",")[0] == "model" and {"text", "objects", "quality", "avg"} <= set(header.split(","))
    assert [row.split(",")[0] for row in rows] == ["base", "teacher:objects", "teacher:quality", "teacher:text",
                                                   "mixed_grpo", "micro"]

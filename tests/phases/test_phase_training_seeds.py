"""Training seeds in the phases: per-seed sub-specs and keys, the stage's `--training-seed`, the seed each trainer
gets, and the seed index every run record and the ledger keep (docs/specs.md#training-seeds)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from flowopd.phases import teacher as teacher_phase
from flowopd.phases.base import run_base
from flowopd.phases.data import run_data
from flowopd.phases.eval import run_eval
from flowopd.phases.keys import (
    TRAINED_PHASES,
    check_stage_key,
    cold_start_sub_spec,
    opd_sub_spec,
    phase_sub_spec,
    stage_key,
    teacher_sub_spec,
)
from flowopd.runtime.records import read_run_record
from flowopd.spec import load_spec, spec_hash

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests/data/micro.yaml"


def seeded_spec(folder: Path, count: int = 2, extra: str = "", parent: Path = MICRO) -> Path:
    path = folder / f"micro_{count}seeds.yaml"
    path.write_text(f"extends: {parent}\nname: micro_seeds\nlabel: micro_seeds\ntraining_seeds: {count}\n{extra}")
    return path


def phase_keys(spec, training_seed: int) -> dict[str, str]:
    phases = [("teacher", name) for name in spec.teachers] + [(p, None) for p in TRAINED_PHASES if p != "teacher"]
    return {f"{phase}:{teacher}": stage_key(phase_sub_spec(spec, phase, teacher, training_seed))
            for phase, teacher in phases}


def test_seed_zero_keys_are_a_one_seed_specs_and_other_seeds_have_their_own(tmp_path):
    one, three = load_spec(MICRO), load_spec(seeded_spec(tmp_path, 3))
    assert phase_keys(three, 0) == phase_keys(one, 0)
    for phase in ("data", "base", "eval"):  # shared by every seed
        assert phase_sub_spec(three, phase, training_seed=2) == phase_sub_spec(one, phase)
    keys = [set(phase_keys(three, seed).values()) for seed in range(3)]
    assert all(len(k) == len(phase_keys(one, 0)) for k in keys) and not (keys[0] & keys[1] or keys[1] & keys[2])
    # a seed-1 student nests the seed-1 cold start, which nests the seed-1 teachers
    student = opd_sub_spec(three, 1)
    assert student["training_seed"] == 1 and student["cold_start"] == cold_start_sub_spec(three, 1)
    assert student["teachers"] == {name: teacher_sub_spec(three, name, 1) for name in three.teachers}
    assert student["cold_start"]["teachers"]["text"]["training_seed"] == 1
    # without a cold start the student starts from the shared base, whatever its seed
    none = load_spec(seeded_spec(tmp_path, 3, "cold_start: {method: none}\n"))
    assert cold_start_sub_spec(none, 2) == cold_start_sub_spec(none, 0)
    assert stage_key(opd_sub_spec(none, 2)) != stage_key(opd_sub_spec(none, 0))


def test_a_folder_keyed_for_one_seed_is_refused_for_another(tmp_path):
    spec_path = seeded_spec(tmp_path)
    spec = load_spec(spec_path)
    folder = tmp_path / "teacher" / stage_key(teacher_sub_spec(spec, "text", 1))
    check_stage_key(spec, spec_path, "teacher", folder, "text", training_seed=1)
    with pytest.raises(SystemExit, match="now gives this stage the key"):
        check_stage_key(spec, spec_path, "teacher", folder, "text", training_seed=0)
    with pytest.raises(SystemExit, match="--training-seed 2: .* has training_seeds 2"):
        teacher_phase.main(["--spec", str(spec_path), "--teacher", "text", "--training-seed", "2", "--data", "d",
                            "--out", str(folder)])
    assert not folder.exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Data and base once; teacher `quality` for seeds 0 and 1 of a two-seed spec (the stage command, keyed folders)
    and once from the one-seed spec; the base and the seed-1 teacher evaluated. Relative paths, as DVC runs them."""
    root, here = tmp_path_factory.mktemp("seeds"), os.getcwd()
    for spec_file in ("specs/flow_opd.yaml", "tests/data/micro.yaml"):  # the run's repository: specs inside it
        (root / spec_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / spec_file, root / spec_file)
    os.chdir(root)
    try:
        spec_path = seeded_spec(Path("."), parent=Path("tests/data/micro.yaml"))
        spec, one = load_spec(spec_path), load_spec("tests/data/micro.yaml")
        run_data(spec, Path("data"))
        run_base(spec, Path("base"), progress=False)
        folders = {}
        for seed in (0, 1):
            folders[seed] = Path("teacher") / stage_key(teacher_sub_spec(spec, "quality", seed))
            teacher_phase.main(["--spec", str(spec_path), "--teacher", "quality", "--training-seed", str(seed),
                                "--base", "base", "--data", "data", "--out", str(folders[seed]), "--no-progress"])
        teacher_phase.run_teacher(one, "quality", Path("base"), Path("data"), Path("one") / folders[0].name,
                                  progress=False)
        run_eval(spec, Path("base"), Path("data"), "base", Path("eval/base"), progress=False)
        run_eval(spec, folders[1], Path("data"), "teacher:quality", Path("eval/teacher1"), progress=False)
    finally:
        os.chdir(here)
    return root, spec, folders


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_seed_zero_trains_what_a_one_seed_spec_trains_and_seed_one_trains_otherwise(runs):
    root, spec, folders = runs
    zero, one_seed = root / folders[0], root / "one" / folders[0].name
    assert folder_bytes(zero) == folder_bytes(one_seed)  # every file DVC hashes, byte for byte
    seed1 = root / folders[1]
    assert json.loads((seed1 / "spec.json").read_text()) == teacher_sub_spec(spec, "quality", 1)
    rewards = [[row.split(",")[1] for row in (folder / "curve.csv").read_text().splitlines()[1:]]
               for folder in (zero, seed1)]
    assert rewards[0] != rewards[1]  # other rollouts: the trainer drew them with seed + 1


def test_run_records_name_the_training_seed_and_the_spec_file(runs):
    root, spec, folders = runs
    for seed in (0, 1):
        record = read_run_record(root / folders[seed])
        assert record["training_seed"] == seed and record["spec_hash"] == spec_hash(spec)
        assert "training_seed" not in json.loads((root / folders[seed] / "meta.json").read_text())
    assert "training_seed" not in read_run_record(root / "base")  # shared by every seed
    assert read_run_record(root / "eval/teacher1")["training_seed"] == 1
    assert read_run_record(root / "eval/base")["training_seed"] is None


def test_the_ledger_keeps_the_training_seed_of_every_run(runs, tmp_path):
    from flowopd.results.ledger import ingest, query

    root, _, _ = runs
    here = os.getcwd()
    os.chdir(root)  # the shards name their model folders relative to where they ran
    try:
        ingest([Path("eval/base"), Path("eval/teacher1")], tmp_path / "ledger.duckdb")
    finally:
        os.chdir(here)
    _, rows = query("SELECT phase, model, training_seed FROM runs ORDER BY phase, model", tmp_path / "ledger.duckdb")
    assert rows == [("base", "base", None), ("eval", "base", None), ("eval", "teacher:quality", 1),
                    ("teacher", "teacher:quality", 1)]

"""Every training phase writes its budget to its run record; a model's total holds every phase it descends from (a
student: its cold start and its teachers, each once; never the base), and the ledger and the report rows read it."""

import csv
import json
import os
from pathlib import Path

import pytest

from flowopd.phases.base import run_base
from flowopd.phases.cold_start import run_cold_start
from flowopd.phases.data import run_data
from flowopd.phases.eval import run_eval
from flowopd.phases.opd import run_opd
from flowopd.phases.teacher import run_teacher
from flowopd.results.budgets import row_budgets
from flowopd.results.ledger import connect, ingest
from flowopd.runtime.records import BUDGET, read_run_record
from flowopd.spec import load_spec

MICRO = Path(__file__).parents[1] / "data" / "micro.yaml"
TEACHERS = ("text", "objects", "quality")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The micro spec's models, base to student, and the student's evaluation (relative paths, as in DVC)."""
    spec, root, here = load_spec(MICRO), tmp_path_factory.mktemp("budgets"), os.getcwd()
    os.chdir(root)
    try:
        run_data(spec, Path("data"))
        run_base(spec, Path("base"), progress=False)
        teachers = {name: Path(f"teacher_{name}") for name in TEACHERS}
        for name, folder in teachers.items():
            run_teacher(spec, name, Path("base"), Path("data"), folder, progress=False)
        run_cold_start(spec, Path("base"), teachers, Path("data"), Path("cold_start"), progress=False)
        run_opd(spec, Path("cold_start"), Path("base"), teachers, Path("data"), Path("student"), progress=False)
        run_eval(spec, Path("student"), Path("data"), "flow_opd", Path("eval"), progress=False)
    finally:
        os.chdir(here)
    return spec, root


def budget_of(root: Path, folder: str) -> dict:
    return read_run_record(root / folder)["budget"]


def key_of(root: Path, folder: str) -> str:
    return json.loads((root / folder / "meta.json").read_text())["sections_hash"]


def own(budget: dict) -> dict:
    return {key: budget[key] for key in BUDGET}


def trained_steps(root: Path, folder: str) -> int:
    """Steps of the curve that updated the weights (a step whose groups all tie trains nothing: no grad_norm)."""
    rows = list(csv.DictReader((root / folder / "curve.csv").read_text().splitlines()))
    return sum(row["grad_norm"] != "" for row in rows)


def summed(*budgets: dict) -> dict:
    total = {key: sum(b[key] for b in budgets) for key in BUDGET}
    return total | {"cpu_s": pytest.approx(total["cpu_s"], abs=1e-2)}


def test_the_base_records_its_own_budget_and_counts_in_no_total(chain):
    spec, root = chain
    base = budget_of(root, "base")
    rows = spec.base.steps * spec.base.batch_size  # one forward of a batch per step, no CFG in pretraining
    assert (base["images"], base["forwards"], base["optimizer_steps"]) == (0, rows, spec.base.steps)
    assert base["cpu_s"] > 0
    assert base["total"] == {"images": 0, "forwards": 0, "optimizer_steps": 0, "cpu_s": 0.0} and base["lineage"] == {}


@pytest.mark.parametrize("name", TEACHERS)
def test_a_teacher_counts_its_rollouts_and_descends_from_no_one_but_the_base(chain, name):
    spec, root = chain
    method = spec.teachers[name].method
    teacher = budget_of(root, f"teacher_{name}")
    assert teacher["images"] == method.steps * method.prompts_per_step * method.group_size
    assert teacher["optimizer_steps"] == trained_steps(root, f"teacher_{name}") * method.inner_epochs
    assert teacher["forwards"] >= teacher["images"] * spec.sampler.steps  # every sampler step, then the updates
    assert teacher["lineage"] == {} and teacher["total"] == own(teacher)


def test_a_student_total_holds_its_cold_start_and_each_teacher_once(chain):
    spec, root = chain
    teachers = {name: budget_of(root, f"teacher_{name}") for name in TEACHERS}
    cold_start, student = budget_of(root, "cold_start"), budget_of(root, "student")
    # a merge generates nothing and takes no step; its total is its teachers'
    assert (cold_start["images"], cold_start["forwards"], cold_start["optimizer_steps"]) == (0, 0, 0)
    assert cold_start["total"] == summed(own(cold_start), *(own(t) for t in teachers.values()))
    assert set(cold_start["lineage"]) == {key_of(root, f"teacher_{name}") for name in TEACHERS}
    # the student: its rollouts and steps, its teachers' and the anchor's forwards are its own
    opd = spec.opd
    assert student["images"] == opd.steps * opd.prompts_per_step * opd.group_size
    assert student["optimizer_steps"] == trained_steps(root, "student") * opd.inner_epochs == opd.steps
    assert student["forwards"] > student["images"] * opd.sampler.steps
    assert set(student["lineage"]) == {key_of(root, "cold_start"), *(key_of(root, f"teacher_{n}") for n in TEACHERS)}
    assert student["total"] == summed(own(student), own(cold_start), *(own(t) for t in teachers.values()))
    assert key_of(root, "base") not in student["lineage"]


def test_the_ledger_keeps_the_budget_of_the_run_a_row_evaluated(chain, tmp_path):
    _, root = chain
    db = tmp_path / "ledger.duckdb"
    here = os.getcwd()
    os.chdir(root)  # the shard names its model folder relative to where the stages ran
    try:
        (eval_run,), _ = ingest([Path("eval")], db)
    finally:
        os.chdir(here)
    student = budget_of(root, "student")
    with connect(db, read_only=True) as con:
        stored = con.execute("SELECT b.images, b.total_images, b.total_forwards, b.total_optimizer_steps, "
                             "b.total_cpu_s FROM runs e JOIN budgets b ON b.run_id = e.parent_run_id "
                             "WHERE e.run_id = ?", [eval_run]).fetchall()
        rows = row_budgets(con, [eval_run, "no such run"])
    total = student["total"]
    assert stored == [(student["images"], total["images"], total["forwards"], total["optimizer_steps"],
                       pytest.approx(total["cpu_s"]))]
    assert rows["run_id"].to_list() == [eval_run, "no such run"]
    assert rows["train_images"].to_list() == [total["images"], None]
    assert rows["train_optimizer_steps"].to_list() == [total["optimizer_steps"], None]
    assert rows["train_cpu_s"][0] == pytest.approx(total["cpu_s"]) and rows["train_cpu_s"][1] is None

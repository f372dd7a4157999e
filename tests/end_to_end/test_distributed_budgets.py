"""Budgets over two processes: each counts its own work and the phase sums them, so a 2-process run counts the images
and optimizer steps of the 1-process run (each image once, each step of the model once) and every forward it ran.

Run: pytest -m distributed    (part of the default run too; each stage launch starts 2 Python processes)
"""

import pytest
from test_distributed import inputs, launch  # noqa: F401 (inputs: the micro spec, its prompts and a base)

from flowopd.phases import cold_start
from flowopd.phases.data import run_data
from flowopd.phases.teacher import run_teacher
from flowopd.runtime.records import read_run_record
from flowopd.spec import load_spec

COUNTS = ("images", "forwards", "optimizer_steps")


def budgets(root, name: str) -> tuple[dict, dict]:
    return tuple(read_run_record(root / f"{name}_{n}")["budget"] for n in (1, 2))


@pytest.mark.distributed
def test_two_processes_count_the_teacher_budget_of_one(inputs):  # noqa: F811
    root, spec_file, spec = inputs
    run_teacher(spec, "quality", root / "base", root / "data", root / "teacher_1", progress=False)
    launch("teacher", 2, "--spec", spec_file, "--teacher", "quality", "--base", root / "base", "--data",
           root / "data", "--out", root / "teacher_2")
    one, two = budgets(root, "teacher")
    method = spec.teachers["quality"].method
    assert one["images"] == method.steps * method.prompts_per_step * method.group_size
    assert {k: one[k] for k in COUNTS} == {k: two[k] for k in COUNTS}  # the rows split evenly: no work twice
    assert two["cpu_s"] > 0 and two["total"] == {k: two[k] for k in (*COUNTS, "cpu_s")}


@pytest.mark.distributed
def test_two_processes_count_each_sft_target_once_and_every_forward(inputs):  # noqa: F811
    """7 text prompts x 3 samples do not split over 2 processes: each process samples them all (forwards twice),
    but each image counts once."""
    root, spec_file, _ = inputs
    sft_file = root / "sft.yaml"
    sft_file.write_text(f"extends: {spec_file}\ntasks: {{text: {{prompts: {{n_train: 7}}}}}}\ncold_start: "
                        "{method: sft, steps: 3, batch_size: 4, lr: 1.0e-3, samples_per_prompt: 3, "
                        "best_of_group: true, sampler: {steps: 2}}\n")
    spec = load_spec(sft_file)
    run_data(spec, root / "sft_data")
    teachers = {name: root / "base" for name in ("text", "objects", "quality")}
    cold_start.run_cold_start(spec, root / "base", teachers, root / "sft_data", root / "sft_1", progress=False)
    launch("cold_start", 2, "--spec", sft_file, "--base", root / "base", "--data", root / "sft_data", "--out",
           root / "sft_2", *[f"--teacher={name}={folder}" for name, folder in teachers.items()])
    one, two = budgets(root, "sft")
    assert one["images"] == two["images"] == (7 + 8 + 8) * 3  # every teacher sample, the discarded ones too
    assert one["optimizer_steps"] == two["optimizer_steps"] == 3
    odd_chunk = 7 * 3 * spec.evaluation.sampler.steps  # the text chunk, sampled whole by the second process too
    assert two["forwards"] == one["forwards"] + odd_chunk
    assert one["lineage"] == {} and one["total"]["images"] == one["images"]  # the teachers here are the base

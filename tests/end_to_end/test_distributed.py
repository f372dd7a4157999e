"""Several processes (accelerate launch, gloo on CPU) reach the weights of one process with the same global batch.

Run: pytest -m distributed    (part of the default run too; each stage launch starts 2 Python processes)
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flowopd.flow.sampler import sample
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.phases import base as base_phase
from flowopd.phases import cold_start
from flowopd.phases import data as data_phase
from flowopd.phases.data import run_data
from flowopd.phases.opd import run_opd
from flowopd.phases.teacher import run_teacher
from flowopd.runtime.artifacts import atomic_folder, write_provenance
from flowopd.runtime.launch import launch_command, relaunch_if_asked
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import read_run_record
from flowopd.spec import load_spec
from flowopd.world import WorldConfig

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "data" / "micro.yaml"
# 2 prompts x 4 samples: 4 rows per process; groups of the same prompt straddle no process boundary, but the
# advantages' and the OPD rewards' batch statistics still need the gathered batch (normalize_advantage; OPD's
# per-element rewards, the main spec's credit, are gathered whole).
GRPO = {"steps": 3, "prompts_per_step": 2, "group_size": 4, "lr": 1e-3, "checkpoint_every": 1,
        "ema": {"decay": 0.9, "every": 1}, "sampler": {"steps": 3}}
NFT = {"kind": "nft", "steps": 3, "prompts_per_step": 2, "group_size": 4, "lr": 1e-3, "checkpoint_every": 1,
       "old_decay": 0.5, "kl_beta": 0.1, "train_times": 2, "ema": {"decay": 0.9, "every": 1}, "sampler": {"steps": 3}}
OPD = {"steps": 3, "prompts_per_step": 2, "group_size": 4, "lr": 1e-3, "checkpoint_every": 1,
       "credit": "element", "normalize_advantage": True, "ema": {"decay": 0.9, "every": 1}, "sampler": {"steps": 3}}


def fake_processes(index: int, count: int) -> Processes:
    return Processes(SimpleNamespace(num_processes=count, process_index=index, device=torch.device("cpu")))


def test_a_batch_split_in_shares_samples_like_the_whole_batch():
    spec = load_spec(MICRO)
    torch.manual_seed(0)
    bundle = TinyBundle(tiny_model_config(spec)).eval()
    cond = bundle.encode(["a red circle", "two blue squares", "the word OK", "a green triangle"])
    options = {"steps": 3, "shift": 3.0, "cfg": 3.0, "noise_level": 0.7, "return_trajectory": True}
    _, whole = sample(bundle, cond, generator=torch.Generator().manual_seed(5), **options)
    for index in range(2):
        rows = fake_processes(index, 2).rows(len(cond))
        _, share = sample(bundle, cond.index(rows), generator=torch.Generator().manual_seed(5), share=(index, 2),
                          **options)
        torch.testing.assert_close(share.latents, whole.latents[:, rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(share.log_probs, whole.log_probs[:, rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(share.means, whole.means[:, rows], rtol=0, atol=1e-6)


def test_a_batch_that_does_not_split_is_refused():
    assert fake_processes(1, 2).rows(8) == slice(4, 8)
    with pytest.raises(ValueError, match="8 samples does not split over 3 processes"):
        fake_processes(0, 3).rows(8)


def test_phases_without_a_split_refuse_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="the cold_start phase runs in one process"):  # a merge
        cold_start.main(["--spec", str(MICRO), "--out", "unused"])
    for phase in ("data", "base"):
        with pytest.raises(SystemExit, match=f"the {phase} phase runs in one process"):
            {"data": data_phase, "base": base_phase}[phase].main(["--spec", str(MICRO), "--out", "unused"])


def test_a_stage_relaunches_itself_under_accelerate_as_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("FLOWOPD_PROCESSES", raising=False)
    monkeypatch.delenv("FLOWOPD_ACCELERATE_CONFIG", raising=False)
    assert launch_command(["--spec", "s.yaml"]) is None
    monkeypatch.setenv("FLOWOPD_PROCESSES", "4")
    command = launch_command(["--spec", "s.yaml"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-2:] == ["--spec", "s.yaml"]
    assert command[command.index("--num_processes") + 1] == "4"
    config = tmp_path / "accelerate.yaml"
    monkeypatch.setenv("FLOWOPD_ACCELERATE_CONFIG", str(config))
    with pytest.raises(SystemExit, match="no accelerate config file"):
        launch_command([])
    config.write_text("num_processes: 8\n")
    command = launch_command([])
    assert command[command.index("--config_file") + 1] == str(config) and "--num_processes" in command
    monkeypatch.delenv("FLOWOPD_PROCESSES")
    assert "--num_processes" not in launch_command([])  # the config file's count


def probe(code: str) -> str:
    """What a fresh interpreter prints (the model module may already be imported in this one)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}).stdout.strip()


def test_a_stage_imports_without_the_collector_and_resumes_it_after_the_model_library():
    stage = ("import gc; from flowopd.runtime.launch import imports_done, pause_gc; pause_gc(); import torch; "
             "paused = not gc.isenabled(); import flowopd.models.tiny; "
             "print(paused, gc.isenabled(), gc.get_freeze_count() > 100000, imports_done() is not None)")
    assert probe(stage) == "True True True True"
    library = ("import gc; import flowopd.models.tiny; from flowopd.runtime.launch import imports_done; "
               "print(gc.isenabled(), gc.get_freeze_count(), imports_done())")
    assert probe(library) == "True 0 None"  # imported as a library, the module leaves the collector alone


def test_a_bad_process_count_is_refused(monkeypatch):
    monkeypatch.setenv("FLOWOPD_PROCESSES", "two")
    with pytest.raises(SystemExit, match="FLOWOPD_PROCESSES must be a positive integer, got 'two'"):
        relaunch_if_asked([])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    spec_file = root / "spec.yaml"
    spec_file.write_text(f"extends: {MICRO}\nteachers:\n  quality:\n    method: {json.dumps(GRPO)}\n"
                         f"  objects:\n    method: {json.dumps(NFT)}\nopd: {json.dumps(OPD)}\n")
    spec = load_spec(spec_file)
    run_data(spec, root / "data")
    torch.manual_seed(0)
    with atomic_folder(root / "base") as folder:  # as the base phase writes it: meta.json records each file's sha256
        TinyBundle(tiny_model_config(spec)).eval().save(folder)
        write_provenance(folder, "base", {})
    return root, spec_file, spec


def launch(stage: str, processes: int, *args) -> subprocess.CompletedProcess:
    env = os.environ | {"FLOWOPD_PROCESSES": str(processes), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *map(str, args), "--no-progress"]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_weights(one: Path, two: Path):
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    base = load_file(one.parent / "base" / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a if k.startswith("transformer."))  # it did train


def assert_same_curves(one: Path, two: Path, keys):
    """The logged statistics are the whole batch's, however many processes computed them."""
    rows = [list(csv.DictReader((folder / "curve.csv").read_text().splitlines())) for folder in (one, two)]
    for a, b in zip(*rows, strict=True):
        for key in keys:
            if a[key] == "" or b[key] == "":  # an empty cell: nothing trained at that step (no reward spread)
                assert a[key] == b[key], (key, a["step"])
                continue
            # abs: a PPO loss at ratio 1 is -mean(A), float noise around 0 (~1e-9 here); an OPD loss of ~1.6e-6 (a
            # KL) differed by 1.2e-8 between 1 and 2 processes on a CPU whose matmul kernels depend on the batch size
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=3e-8), (key, a["step"])


BUDGET_COUNTS = ("images", "forwards", "optimizer_steps")


def budgets(root, name: str) -> tuple[dict, dict]:
    """The run records' training budgets of <name>_1 (one process) and <name>_2 (two)."""
    return tuple(read_run_record(root / f"{name}_{n}")["budget"] for n in (1, 2))


@pytest.mark.distributed
def test_two_processes_train_the_teacher_of_one(inputs):
    root, spec_file, spec = inputs
    run_teacher(spec, "quality", root / "base", root / "data", root / "teacher_1", progress=False)
    launch("teacher", 2, "--spec", spec_file, "--teacher", "quality", "--base", root / "base", "--data",
           root / "data", "--out", root / "teacher_2")
    assert_same_weights(root / "teacher_1", root / "teacher_2")
    assert read_run_record(root / "teacher_2")["processes"] == 2  # provenance, not part of the artifact
    # the budget: each process counts its own work, the phase sums them, so each image and step counts once
    one, two = budgets(root, "teacher")
    method = spec.teachers["quality"].method
    assert one["images"] == method.steps * method.prompts_per_step * method.group_size
    assert {k: one[k] for k in ("images", "optimizer_steps")} == {k: two[k] for k in ("images", "optimizer_steps")}
    # forwards: the sampling's, then the update's. One process updates the kept groups' rows only (the tiny model's
    # kept_rows_only), two processes every row of a step that trains (a quality prompt of several objects can leave
    # a group without reward spread), so each updated row costs as many forwards in both: equal counts when every
    # group is kept
    rows = method.prompts_per_step * method.group_size
    curve = (root / "teacher_1" / "curve.csv").read_text().splitlines()
    kept = [float(row["kept_groups"]) for row in csv.DictReader(curve)]
    updated = {1: sum(round(k * rows) for k in kept), 2: sum(rows for k in kept if k > 0)}
    sampling = one["images"] * method.sampler.steps * (1 if method.sampler.cfg == 1 else 2)
    per_row = {n: (budget["forwards"] - sampling) / updated[n] for n, budget in ((1, one), (2, two))}
    assert per_row[1] == per_row[2] and per_row[1] == int(per_row[1]) > 0, (one["forwards"], two["forwards"], kept)
    assert two["cpu_s"] > 0 and two["total"] == {k: two[k] for k in (*BUDGET_COUNTS, "cpu_s")}
    one, two = ({k: v for k, v in json.loads((root / f"teacher_{n}" / "meta.json").read_text()).items()
                 if k not in ("weights_sha256", "files")} for n in (1, 2))
    assert one == two  # the process count is not in the artifact; the weights (hence file hashes) differ in float
    # summation order
    one, two = (Path(root / f"teacher_{n}" / "curve.csv").read_text().splitlines() for n in (1, 2))
    assert one[0] == two[0] and len(one) == len(two) == 1 + GRPO["steps"]


@pytest.mark.distributed
def test_two_processes_train_the_nft_teacher_of_one(inputs):
    """NFT: the flow-matching noise of the whole batch is drawn everywhere and each process keeps its rows."""
    root, spec_file, spec = inputs
    run_teacher(spec, "objects", root / "base", root / "data", root / "nft_1", progress=False)
    launch("teacher", 2, "--spec", spec_file, "--teacher", "objects", "--base", root / "base", "--data",
           root / "data", "--out", root / "nft_2")
    assert_same_weights(root / "nft_1", root / "nft_2")
    assert_same_curves(root / "nft_1", root / "nft_2", ("reward", "loss", "policy_loss", "kl"))
    rows = list(csv.DictReader((root / "nft_1" / "curve.csv").read_text().splitlines()))
    assert sum(row["loss"] != "" for row in rows) >= 2  # it trained on most steps


@pytest.mark.distributed
def test_two_processes_distil_the_student_of_one(inputs):
    root, spec_file, spec = inputs
    teachers = {name: root / "base" for name in ("text", "objects")} | {"quality": root / "teacher_1"}
    if not (root / "teacher_1").exists():
        run_teacher(spec, "quality", root / "base", root / "data", root / "teacher_1", progress=False)
    run_opd(spec, root / "base", root / "base", teachers, root / "data", root / "student_1", progress=False)
    launch("opd", 2, "--spec", spec_file, "--init", root / "base", "--base", root / "base", "--data", root / "data",
           "--out", root / "student_2", *[f"--teacher={name}={folder}" for name, folder in teachers.items()])
    assert_same_weights(root / "student_1", root / "student_2")
    assert read_run_record(root / "student_2")["processes"] == 2
    assert_same_curves(root / "student_1", root / "student_2", ("reward", "kl", "v_mse", "loss", "mar_kl"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_distil_by_velocity_mse_like_one(inputs, tmp_path):
    """DanceOPD's one state per rollout: the query steps are drawn for the whole batch, each process keeps its rows."""
    root, _, spec = inputs
    if not (root / "teacher_1").exists():
        run_teacher(spec, "quality", root / "base", root / "data", root / "teacher_1", progress=False)
    spec_file = tmp_path / "velocity_mse.yaml"
    opd = OPD | {"estimator": "velocity_mse", "credit": "step", "normalize_advantage": False,
                 "sampler": {"steps": 3, "noise_level": 0.0}}
    spec_file.write_text(f"extends: {MICRO}\nopd: {json.dumps(opd)}\n")
    teachers = {name: root / "base" for name in ("text", "objects")} | {"quality": root / "teacher_1"}
    run_opd(load_spec(spec_file), root / "base", root / "base", teachers, root / "data", tmp_path / "student_1",
            progress=False)
    launch("opd", 2, "--spec", spec_file, "--init", root / "base", "--base", root / "base", "--data", root / "data",
           "--out", tmp_path / "student_2", *[f"--teacher={name}={folder}" for name, folder in teachers.items()])
    (tmp_path / "base").symlink_to(root / "base")  # assert_same_weights compares against <parent>/base
    assert_same_weights(tmp_path / "student_1", tmp_path / "student_2")
    assert_same_curves(tmp_path / "student_1", tmp_path / "student_2", ("reward", "v_mse", "loss", "mar_kl"))


@pytest.mark.distributed
def test_two_processes_fit_the_sft_cold_start_of_one(inputs):
    """Odd chunks (7 text prompts x 3 samples) are sampled whole by each process, even ones split; the scoring and
    every SFT batch split too."""
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
    assert_same_weights(root / "sft_1", root / "sft_2")
    assert read_run_record(root / "sft_2")["processes"] == 2
    one, two = (json.loads((root / f"sft_{n}" / "meta.json").read_text()) for n in (1, 2))
    assert one["samples"] == two["samples"] == 8 + 7 + 8 and one["routing"] == two["routing"]
    one, two = budgets(root, "sft")  # each image once; the odd text chunk's forwards ran in both processes
    assert one["images"] == two["images"] == (7 + 8 + 8) * 3 and one["optimizer_steps"] == two["optimizer_steps"] == 3
    assert two["forwards"] == one["forwards"] + 7 * 3 * spec.evaluation.sampler.steps
    assert one["lineage"] == {} and one["total"]["images"] == one["images"]  # the teachers here are the base


@pytest.mark.distributed
def test_two_processes_evaluate_like_one(inputs):
    """66 test prompts per task: two sampling batches of 64 and 2, one per process; the same images, scores,
    grids and metrics as one process. The default world's letters and colours hold 66 distinct test prompts per task
    (the main spec's world: 32 words, 37 scenes); the model's vocabulary reads the new words as unknown tokens."""
    root, spec_file, spec = inputs
    if not (root / "teacher_1").exists():
        run_teacher(spec, "quality", root / "base", root / "data", root / "teacher_1", progress=False)
    eval_file = root / "eval.yaml"
    world = WorldConfig()
    eval_file.write_text(f"extends: {spec_file}\nworld: {{alphabet: {world.alphabet}, colours: {list(world.colours)}}}"
                         "\ntasks:\n" + "".join(f"  {task}: {{prompts: {{n_test: 66}}}}\n"
                                               for task in ("text", "objects", "quality")))
    run_data(load_spec(eval_file), root / "eval_data")
    for processes in (1, 2):
        launch("eval", processes, "--spec", eval_file, "--model", root / "teacher_1", "--data", root / "eval_data",
               "--label", "base", "--out", root / f"eval_{processes}")
    one, two = root / "eval_1", root / "eval_2"
    assert json.loads((one / "metrics.json").read_text())["benchmarks"]["text"]["n"] == 66
    for name in ("metrics.json", "samples.jsonl", "grid_text.png", "grid_objects.png", "meta.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert read_run_record(two)["processes"] == 2

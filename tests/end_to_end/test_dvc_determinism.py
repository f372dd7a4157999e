"""The same inputs give the same DVC hash: a training stage rerun by force, or killed and resumed, writes its folder
bit for bit again, so nothing downstream is stale (issue: deterministic artifacts). Run provenance lives beside.

Run: pytest -m slow tests/end_to_end/test_dvc_determinism.py
"""

import json
import shutil
import subprocess
import sys
import time

import psutil
import pytest
from dvc_repo import MICRO, environment, locked_out, ran, run, scratch_repo

from flowopd.phases.keys import sub_spec_hash
from flowopd.pipeline import dvc as pipeline
from flowopd.pipeline.experiment import set_value
from flowopd.runtime.records import read_run_record
from flowopd.spec import load_spec, spec_hash

# The text teacher checkpoints every step, so a kill after the first checkpoint leaves steps to resume.
TEXT_TEACHER = "  text: {method: {kind: grpo, steps: 2, prompts_per_step: 1, group_size: 2}}"
assert TEXT_TEACHER in MICRO
SPEC = MICRO.replace(TEXT_TEACHER, TEXT_TEACHER.replace("steps: 2,", "steps: 8, checkpoint_every: 1,"))
# About 100 s on a busy 2-core machine (seven stage processes): behind the slow marker.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tree = scratch_repo(tmp_path_factory.mktemp("repo"), {"micro.yaml": SPEC})
    pipeline.write(tree)
    run(tree, "git", "add", "dvc.yaml")
    run(tree, "git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "dvc.yaml")
    stages = pipeline.build(tree)["stages"]
    teacher = next(name for name in stages if name.startswith("teacher-text-"))
    out = stages[teacher]["outs"][0]
    key = teacher.removeprefix("teacher-text-")
    evaluation = next(name for name in stages if name.startswith(f"eval-teacher-{key}-"))
    return tree, teacher, out, evaluation


def downstream_is_up_to_date(tree, evaluation: str) -> None:
    status = run(tree, "dvc", "status", evaluation).stdout  # the eval stage and everything upstream of it
    assert "up to date" in status, status


def kill_after_first_checkpoint(tree, teacher: str, out: str) -> None:
    """Start the stage through DVC, SIGKILL its process as soon as its first checkpoint is on disk."""
    command = ["dvc", "repro", "--force", "--single-item", teacher]
    proc = subprocess.Popen(command, cwd=tree, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint, deadline = tree / f"{out}.ckpt" / "state.pt", time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before its first checkpoint"
        time.sleep(0.01)
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "stages/teacher.py" in " ".join(child.cmdline()):
            child.kill()
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, output
    assert checkpoint.exists() and not (tree / out).exists()


def test_a_rerun_and_a_resumed_run_give_the_same_hash_and_leave_downstream_alone(repo):
    tree, teacher, out, evaluation = repo
    assert {teacher, evaluation} <= ran(run(tree, "dvc", "repro", evaluation).stdout)
    first, first_run = locked_out(tree, teacher, out), read_run_record(tree / out)
    downstream_is_up_to_date(tree, evaluation)
    assert first_run["git_dirty"] is False  # DVC wrote dvc.lock during the run: that is not a dirty tree

    # Forced rerun: new run record, same folder hash, downstream untouched.
    assert ran(run(tree, "dvc", "repro", "--force", "--single-item", teacher).stdout) == {teacher}
    assert locked_out(tree, teacher, out)["md5"] == first["md5"]
    assert read_run_record(tree / out)["finished"] != first_run["finished"]
    downstream_is_up_to_date(tree, evaluation)

    # Killed after its first checkpoint, then resumed by the next repro: the same folder hash again.
    kill_after_first_checkpoint(tree, teacher, out)
    resumed = run(tree, "dvc", "repro", "--single-item", teacher).stdout
    assert "resuming" in resumed and ran(resumed) == {teacher}
    assert locked_out(tree, teacher, out)["md5"] == first["md5"]
    downstream_is_up_to_date(tree, evaluation)
    assert not (tree / f"{out}.ckpt").exists()


def test_an_experiment_on_a_spec_field_keeps_honest_folder_names(repo):
    tree, teacher, _, evaluation = repo
    run(tree, "dvc", "repro", evaluation)  # (a no-op after the test above)
    refused = run(tree, "dvc", "exp", "run", "-S", "specs/micro.yaml:evaluation.seeds=[0]", evaluation, check=False)
    assert refused.returncode != 0 and "flowopd exp run -S" in refused.stdout + refused.stderr
    run(tree, "git", "checkout", "--", "specs/micro.yaml", "dvc.yaml")  # what `dvc exp run -S` left behind

    # the eval stage's name after the edit (its new key), so the experiment runs it alone
    edited = tree / "specs/edited.yaml"
    edited.write_text(set_value((tree / "specs/micro.yaml").read_text(), ["evaluation", "seeds"], [0], "micro"))
    renamed = f"eval-teacher-{teacher.removeprefix('teacher-text-')}-{sub_spec_hash(load_spec(edited), 'eval')[:10]}"
    edited.unlink()
    done = run(tree, sys.executable, "-m", "flowopd", "exp", "run", "-S", "specs/micro.yaml:evaluation.seeds=[0]",
               renamed)
    assert ran(done.stdout) == {renamed} and renamed != evaluation
    folder = tree / "artifacts/eval" / renamed.removeprefix("eval-")
    meta, record = json.loads((folder / "meta.json").read_text()), read_run_record(folder)
    assert folder.name.endswith(meta["sections_hash"][:10])  # folder name = stage key = meta
    assert json.loads((folder / "spec.json").read_text())["evaluation"]["seeds"] == [0]
    assert record["spec_hash"] == spec_hash(load_spec(tree / "specs/micro.yaml"))
    assert record["git_dirty"] is True  # the spec differs from the commit the experiment started from
    assert len(run(tree, "dvc", "exp", "list", "--name-only").stdout.split()) == 1  # the refused one is not kept

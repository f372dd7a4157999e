"""`flowopd pipeline run`: DVC stages side by side in dependency order, recorded as `dvc repro` records them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flowopd.pipeline.runner import downstream, read_stages, run, stage_graph, stage_slots

DVC = Path(sys.executable).with_name("dvc")
pytestmark = pytest.mark.skipif(not DVC.exists() or not shutil.which("git"), reason="needs dvc and git")


def project(tmp_path: Path, stages: dict) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return tmp_path


def timed(name: str, seconds: float = 1.0, deps: tuple[str, ...] = (), fail: bool = False) -> dict:
    """A stage that notes its start and end (monotonic clock of the shell: date +%s.%N) and writes out/<name>."""
    body = f"date +%s.%N > times/{name}.start && sleep {seconds} && " + ("exit 3" if fail else
                                                                        f"cat {' '.join(deps) or '/dev/null'} > out/{name}"
                                                                        f" && echo {name} >> out/{name}")
    return {"cmd": f"mkdir -p times out && {body} && date +%s.%N > times/{name}.end",
            "deps": list(deps), "outs": [f"out/{name}"]}


def times(root: Path, name: str) -> tuple[float, float]:
    return tuple(float((root / "times" / f"{name}.{edge}").read_text()) for edge in ("start", "end"))


def test_graph_and_downstream(tmp_path):
    root = project(tmp_path, {"a": timed("a"), "b": timed("b"), "c": timed("c", deps=("out/a", "out/b")),
                              "d": timed("d", deps=("out/c",))})
    graph = stage_graph(read_stages(root / "dvc.yaml"))
    assert graph == {"a": set(), "b": set(), "c": {"a", "b"}, "d": {"c"}}
    assert downstream(graph, {"b"}) == {"b", "c", "d"}
    assert downstream(graph, {"d"}) == {"d"}


def test_runs_independent_stages_side_by_side_then_dependents(tmp_path):
    root = project(tmp_path, {"a": timed("a", 2), "b": timed("b", 2), "c": timed("c", 0.1, deps=("out/a", "out/b"))})
    assert run(root, jobs=2, progress=False) == 0
    (a0, a1), (b0, b1), (c0, _) = (times(root, n) for n in "abc")
    assert a0 < b1 and b0 < a1  # a and b overlapped
    assert c0 >= max(a1, b1)  # c waited for both
    assert (root / "out" / "c").read_text().split() == ["a", "b", "c"]
    status = subprocess.run([str(DVC), "status"], cwd=root, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout  # dvc.lock records every stage, as dvc repro would
    assert (root / "logs" / "a.log").exists()
    timeline = json.loads((root / "logs" / "run.json").read_text())
    assert timeline["jobs"] == 2 and set(timeline["stages"]) == {"a", "b", "c"}
    assert all(t["exit"] == 0 and t["ended"] >= t["started"] for t in timeline["stages"].values())


def test_up_to_date_stages_do_not_run_again_and_a_change_reruns_downstream(tmp_path, capsys):
    root = project(tmp_path, {"a": timed("a", 0.1), "b": timed("b", 0.1, deps=("in.txt",)),
                              "c": timed("c", 0.1, deps=("out/b",))})
    (root / "in.txt").write_text("one\n")
    assert run(root, jobs=2, progress=False) == 0
    first = {name: times(root, name) for name in "abc"}
    capsys.readouterr()
    assert run(root, jobs=2, progress=False) == 0
    assert "up to date" in capsys.readouterr().out
    (root / "in.txt").write_text("two\n")
    assert run(root, jobs=2, progress=False) == 0
    assert times(root, "a") == first["a"]  # untouched
    assert times(root, "b") != first["b"] and times(root, "c") != first["c"]


def test_a_failure_stops_new_stages_keeps_finished_ones_and_shows_the_log(tmp_path, capsys):
    root = project(tmp_path, {"ok": timed("ok", 1), "bad": timed("bad", 0.1, fail=True),
                              "after": timed("after", 0.1, deps=("out/bad",)), "late": timed("late", 0.1)})
    assert run(root, jobs=2, progress=False) == 1
    err = capsys.readouterr().err
    assert "bad" in err and "1 stage(s) failed" in err
    assert (root / "out" / "ok").exists()  # the stage running beside the failure finished
    assert not (root / "times" / "after.start").exists()  # nothing downstream started
    assert not (root / "times" / "late.start").exists()  # nor anything new
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "ok" in lock["stages"] and "bad" not in lock["stages"]


def test_a_stage_on_every_core_runs_alone(tmp_path):
    """An evaluation (its command runs stages/eval.py) takes all slots: nothing runs beside it."""
    alone = timed("e", 1)
    alone["cmd"] = ": stages/eval.py && " + alone["cmd"]
    root = project(tmp_path, {"a": timed("a", 1.5), "e": alone, "b": timed("b", 1.5)})
    assert stage_slots(read_stages(root / "dvc.yaml"), 2) == {"a": 1, "e": 2, "b": 1}
    assert run(root, jobs=2, progress=False) == 0
    (a0, a1), (e0, e1), (b0, b1) = (times(root, n) for n in "aeb")
    assert a0 < b1 and b0 < a1  # the one-slot stages shared the two slots
    assert e0 >= max(a1, b1) or e1 <= min(a0, b0)  # the evaluation overlapped neither


def test_kill_stops_the_running_stages(tmp_path):
    """`kill` (SIGTERM) of the runner stops its stages, even ones that ignore SIGINT, before it exits."""
    stage = {"cmd": "echo $$ > pid && trap '' INT && sleep 60 && touch done", "outs": ["done"]}
    root = project(tmp_path, {"slow": stage})
    code = "import sys; from flowopd.pipeline import runner; runner.STOP_GRACE = 1; runner.run(sys.argv[1], 1, False)"
    process = subprocess.Popen([sys.executable, "-c", code, str(root)])
    for _ in range(100):
        if (root / "pid").exists() and (root / "pid").read_text().strip():
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) != 0
    pid = int((root / "pid").read_text())
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status may wait a while for init to collect it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

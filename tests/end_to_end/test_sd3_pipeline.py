"""The GPU pipeline end to end on CPU: `dvc repro` in sd3/ (its own DVC project) on copies of specs/sd3/*.yaml pointed at a tiny
random SD3 pipeline folder, a tiny random CLIP as PickScore and stub GenEval / DeQA servers on 127.0.0.1.

Run: pytest -m slow tests/end_to_end/test_sd3_pipeline.py
"""

import json
import shutil
import threading
from http.server import ThreadingHTTPServer

import duckdb
import pytest
import yaml
from dvc_repo import ROOT, ran, run, scratch_repo
from reward_stubs import StubHandler, save_tiny_clip
from tiny_sd3 import RESOLUTION, tiny_sd3_bundle

from flowopd.pipeline import dvc as pipeline
from flowopd.runtime.records import read_run_record
from flowopd.spec import deep_merge

# Twenty-one stage processes, each importing torch, diffusers and transformers: minutes, behind the slow marker.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="dvc needs git")]
PROMPTS = {  # Flow-GRPO's file layout under data/sd3/, a few prompts each
    "geneval/train_metadata.jsonl": [{"prompt": f"a photo of {n} cats", "tag": "counting"} for n in (2, 3, 4)],
    "geneval/test_metadata.jsonl": [{"prompt": f"a photo of {n} dogs", "tag": "counting"} for n in (2, 3)],
    "ocr/train.txt": [f'A sign that says "{w}"' for w in ("OPEN", "EXIT", "STOP")],
    "ocr/test.txt": [f'A sign that says "{w}"' for w in ("SALE", "CAFE")],
    "pickscore/train.txt": ["a castle at dusk", "a bowl of fruit", "a red bicycle"],
    "pickscore/test.txt": ["a quiet harbour", "a snowy street"],
    "drawbench/test.txt": ["a blue cube on a green sphere", "an elephant under the sea"],
}
# micro-batches of 1 (the shipped 16 and 8 would not split a batch of 2): the split path runs end to end
SMALL = {"steps": 2, "prompts_per_step": 1, "group_size": 2, "checkpoint_every": 1, "micro_batch": 1}
SMALL_DECODE = {"decode_batch": 1, "reward_batch": 2}


@pytest.fixture(scope="module")
def servers():
    """GenEval and DeQA stand-ins: scores from image means (StubHandler)."""
    running = []
    for _ in ("geneval", "deqa"):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
        httpd.daemon_threads, httpd.mode, httpd.calls, httpd.bodies = True, "ok", 0, []
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        running.append(httpd)
    yield {name: f"http://127.0.0.1:{s.server_address[1]}" for name, s in zip(("geneval", "deqa"), running)}
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def small_sd3_specs(servers: dict) -> dict[str, str]:
    """specs/sd3/*.yaml as shipped, with the model, scorers, servers and step counts made tiny."""
    main = yaml.safe_load((ROOT / "specs/sd3/flow_opd.yaml").read_text())  # anchors resolved
    main = deep_merge(main, {
        "model": {"pretrained": "models/tiny_sd3", "resolution": RESOLUTION, "dtype": "fp32",
                  "lora": {"rank": 2, "alpha": 4.0}},
        "sampler": {"steps": 2},
        "tasks": {"geneval": {"remote": {"url": servers["geneval"], "timeout": 30.0, "batch_size": 8}},
                  "deqa": {"remote": {"url": servers["deqa"], "timeout": 30.0, "batch_size": 8}},
                  "pickscore": {"pickscore": {"model": "models/PickScore_v1", "processor": None, "batch_size": 4}}},
        "teachers": {name: {"method": SMALL | SMALL_DECODE} for name in main["teachers"]},
        "baseline": {"method": SMALL | SMALL_DECODE},
        "opd": SMALL,
        "evaluation": {"n_prompts": 2, "grid_size": 2, "sampler": {"steps": 2}},
    })
    sft = yaml.safe_load((ROOT / "specs/sd3/sft_init.yaml").read_text())
    sft["cold_start"] |= {"steps": 2, "batch_size": 2, "samples_per_prompt": 2, "micro_batch": 1, **SMALL_DECODE}
    return {"sd3/flow_opd.yaml": yaml.safe_dump(main, sort_keys=False), "sd3/sft_init.yaml": yaml.safe_dump(sft),
            "sd3/no_mar.yaml": (ROOT / "specs/sd3/no_mar.yaml").read_text()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, servers):
    tree = scratch_repo(tmp_path_factory.mktemp("sd3repo"), small_sd3_specs(servers))
    tiny_sd3_bundle().pipe.save_pretrained(tree / "models/tiny_sd3")
    save_tiny_clip(tree / "models/PickScore_v1")
    for name, prompts in PROMPTS.items():
        path = tree / "data/sd3" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(p) if isinstance(p, dict) else p for p in prompts]
        path.write_text("".join(line + "\n" for line in lines))
    assert pipeline.write(tree) == ["sd3/dvc.yaml"]  # no tiny spec here: no dvc.yaml at the root
    run(tree, "git", "add", "-A")
    run(tree, "git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "sd3 pipeline")
    return tree


def test_the_sd3_pipeline_runs_every_phase_through_dvc_then_is_a_no_op(repo):
    stages = pipeline.build(repo, pipeline.PIPELINES[1])["stages"]
    project = repo / "sd3"  # a DVC project of its own: the root's `dvc status` never lists its stages
    root = run(repo, "dvc", "status").stdout
    assert not any(name in root for name in stages), root  # no tiny spec here: the root project tracks nothing
    done = run(project, "dvc", "repro")
    assert ran(done.stdout) == set(stages), done.stdout[-3000:]
    assert {name.split("-")[0] for name in stages} == {"data", "base", "teacher", "baseline", "cold_start", "opd",
                                                       "eval", "ledger", "report"}
    assert ran(run(project, "dvc", "repro").stdout) == set()  # a no-op
    assert "up to date" in run(project, "dvc", "status").stdout
    assert "failed" not in run(project, "dvc", "metrics", "show").stdout

    con = duckdb.connect(str(project / "reports/ledger.duckdb"), read_only=True)
    try:
        phases = dict(con.execute("SELECT phase, count(*) FROM runs GROUP BY phase").fetchall())
        dirty = {row[0] for row in con.execute("SELECT DISTINCT git_dirty FROM runs").fetchall()}
    finally:
        con.close()
    assert phases == {"eval": 9, "base": 1, "teacher": 4, "baseline": 1, "opd": 3}  # each evaluated model's run
    assert dirty == {False}  # DVC wrote sd3/dvc.lock and sd3/reports during the run: still a clean tree
    table = (project / "reports/main_table.csv").read_text().splitlines()
    assert len(table) == 1 + 9 and table[0].startswith("model,") and table[1].startswith("base,")
    for name, stage in stages.items():
        if name not in ("ledger", "report"):  # every artifact folder with its run record beside it
            assert read_run_record(project / stage["outs"][0])["phase"] == name.split("-")[0]

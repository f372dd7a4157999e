"""The pipeline's fixed cost: process start-up and DVC bookkeeping around the stages' own seconds.

    records  (default) a finished pipeline's run records (`<out>.run.json` beside each stage folder of dvc.yaml, or
             of --dvc-yaml): per stage, in run order, its start-up (process start to the phase's clock), its import
             (process start to the end of torch's and the model library's import: its first line of work), its
             seconds and the gap before it (the previous stage's finish to this process's start: the previous
             process's exit and DVC's bookkeeping). Then the span (first process start to last finish), the sum of
             the stages' seconds and the fixed cost = span - sum; with --wall S (the timed `dvc repro`, e.g.
             `/usr/bin/time -f %e make repro` minus the install) also wall - sum, the definition of the 290 s
             measured before (the ledger and report stages, which write no run record, and DVC's own start-up are in
             it, not in the span).
    startup  every stage command on the micro spec (tests/data/micro.yaml) in a scratch folder: the process's wall
             time, its seconds (run record, or meta.json for code from before run records) and the difference, i.e.
             what a stage costs outside its clock; from the run record, its import to first work and its exit time.
             --code DIR [DIR ...] runs these checkouts' flowopd and stages/ (e.g. `git archive <rev> | tar -x -C
             DIR`) side by side, interleaved, and prints their ratios to the first. Also times the import of torch and
             the model library (`flowopd.models.tiny`, diffusers' SD3 transformer) with the collector on and paused.

    .venv/bin/python benchmarks/bench_pipeline.py records --wall 1751
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pipeline.py startup [--code OLD NEW] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAME_RUN_GAP = 600.0  # seconds: a longer gap between two records means they come from different `dvc repro` runs


# ---------------------------------------------------------------- records of a finished pipeline
def stage_records(dvc_yaml: Path) -> list[tuple[str, dict]]:
    """(stage name, run record) of every stage of dvc.yaml whose first output has a run record, in run order."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    found = []
    for name, stage in stages.items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])]
        path = dvc_yaml.parent / (outs[0] + ".run.json") if outs else None
        if path is not None and path.is_file():
            record = json.loads(path.read_text())
            if record.get("process_started") and record.get("finished"):
                found.append((name, record))
    return sorted(found, key=lambda item: item[1]["process_started"])


def moment(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def latest_run(records: list[tuple[str, dict]]) -> tuple[list[tuple[str, dict]], int]:
    """The records of the last `dvc repro` run (no gap over SAME_RUN_GAP between them); and how many are older."""
    first = 0
    for i in range(1, len(records)):
        if moment(records[i][1]["process_started"]) - moment(records[i - 1][1]["finished"]) > SAME_RUN_GAP:
            first = i
    return records[first:], first


def report_records(dvc_yaml: Path, wall: float | None) -> None:
    records, older = latest_run(stage_records(dvc_yaml))
    if not records:
        raise SystemExit(f"no run records with process start times beside the stage folders of {dvc_yaml}")
    print(f"{'stage':44s} {'gap s':>7s} {'start-up s':>10s} {'import s':>8s} {'seconds':>9s}")
    previous, startups, imports, gaps, seconds = None, [], [], [], []
    for name, record in records:
        gap = None if previous is None else moment(record["process_started"]) - moment(previous["finished"])
        startup, imported = record.get("startup_seconds"), record.get("import_seconds")
        own = record.get("seconds") or 0.0
        print(f"{name[:44]:44s} {'' if gap is None else f'{gap:7.2f}':>7s} "
              f"{'' if startup is None else f'{startup:10.2f}':>10s} "
              f"{'' if imported is None else f'{imported:8.2f}':>8s} {own:9.2f}")
        gaps += [] if gap is None else [gap]
        startups += [] if startup is None else [startup]
        imports += [] if imported is None else [imported]
        seconds.append(own)
        previous = record
    span = moment(records[-1][1]["finished"]) - moment(records[0][1]["process_started"])
    print(f"\n{len(records)} stages with run records" + (f" ({older} older ones, from an earlier run, left out)"
                                                         if older else ""))
    print(f"sum of the stages' seconds:            {sum(seconds):8.1f} s")
    print(f"start-up (process start to the clock): {sum(startups):8.1f} s  (mean {mean(startups):.2f} s, "
          f"max {max(startups, default=0):.2f} s per stage)")
    if imports:
        print(f"import to first work (model stages):   mean {mean(imports):.2f} s, max {max(imports):.2f} s per stage "
              f"({len(imports)} stages)")
    print(f"gaps between stages (exit, DVC):       {sum(gaps):8.1f} s  (mean {mean(gaps):.2f} s)")
    print(f"span, first start to last finish:      {span:8.1f} s; fixed cost span - seconds: {span - sum(seconds):.1f} s")
    if wall is not None:
        print(f"wall {wall:.1f} s; fixed cost wall - seconds: {wall - sum(seconds):.1f} s")
    report_timeline(dvc_yaml.parent / "logs" / "run.json", dict(records))


def report_timeline(path: Path, records: dict[str, dict]) -> None:
    """With stages side by side (`flowopd pipeline run`, whose logs/run.json times each `dvc repro --single-item`),
    gaps and spans overlap: what a stage costs outside its clock is then its dvc process's wall minus its seconds."""
    if not path.exists():
        return
    timeline = json.loads(path.read_text())
    outside = {name: (t["ended"] - t["started"]) - records[name]["seconds"] for name, t in timeline["stages"].items()
               if name in records and "ended" in t and records[name].get("seconds") is not None}
    if not outside:
        return
    starts = [t["started"] for t in timeline["stages"].values()]
    ends = [t["ended"] for t in timeline["stages"].values() if "ended" in t]
    busy = sum(records[name]["seconds"] for name in outside)
    print(f"\n{path}: {len(timeline['stages'])} stages, -j {timeline['jobs']}, {max(ends) - min(starts):.1f} s from the "
          f"first start to the last end; stage seconds {busy:.1f}")
    print(f"outside each stage's clock (its dvc process's wall - seconds): mean {mean(list(outside.values())):.2f} s, "
          f"max {max(outside.values()):.2f} s over {len(outside)} stages with run records")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- start-up of each stage command
def stage_commands(spec: Path, tmp: Path) -> list[tuple[str, list[str], Path | None]]:
    """(name, arguments after `python`, output folder or None) for every phase of the micro spec, in order."""
    teachers = [f"--teacher={name}={tmp / 'teacher'}" for name in ("text", "objects", "quality")]
    common = ["--spec", str(spec), "--data", str(tmp / "data"), "--base", str(tmp / "base")]
    quiet = ["--no-progress"]
    return [
        ("data", ["stages/data.py", "--spec", str(spec), "--out", str(tmp / "data")], tmp / "data"),
        ("base", ["stages/base.py", "--spec", str(spec), "--out", str(tmp / "base"), *quiet], tmp / "base"),
        ("teacher", ["stages/teacher.py", *common, "--teacher", "text", "--out", str(tmp / "teacher"), *quiet],
         tmp / "teacher"),
        ("baseline", ["stages/baseline.py", *common, "--out", str(tmp / "baseline"), *quiet], tmp / "baseline"),
        ("cold_start", ["stages/cold_start.py", *common, *teachers, "--out", str(tmp / "cold_start"), *quiet],
         tmp / "cold_start"),
        ("opd", ["stages/opd.py", *common, *teachers, "--init", str(tmp / "cold_start"), "--out", str(tmp / "opd"),
                 *quiet], tmp / "opd"),
        ("eval", ["stages/eval.py", "--spec", str(spec), "--model", str(tmp / "opd"), "--data", str(tmp / "data"),
                  "--label", "micro", "--out", str(tmp / "eval"), *quiet], tmp / "eval"),
        ("ledger", ["stages/ledger.py", "--db", str(tmp / "ledger.duckdb"), str(tmp / "eval")], None),
        ("report", ["stages/report.py", "--db", str(tmp / "ledger.duckdb"), "--out", str(tmp / "report"),
                    str(tmp / "eval")], None),
    ]


def stage_facts(folder: Path | None) -> dict:
    """The phase's own seconds (its run record, else meta.json for code from before run records; 0 without a
    folder), and from the run record, if it has them, its import seconds and its process's start and finish."""
    if folder is None:
        return {"seconds": 0.0}
    for path in (folder.with_name(folder.name + ".run.json"), folder / "meta.json"):
        facts = json.loads(path.read_text()) if path.is_file() else {}
        if "seconds" in facts:
            return facts
    return {"seconds": 0.0}


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, epoch seconds at the end) of a command."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start, time.time()


def report_startup(codes: list[Path], repeat: int) -> None:
    """Each stage command on the micro spec for every checkout in `codes`, interleaved (stage by stage, the checkouts
    in turn, `repeat` times), the best run of each kept: least time outside the clock."""
    print(f"each stage on tests/data/micro.yaml, best of {repeat} (least time outside the clock)")
    print("outside: wall - seconds; import: process start to the end of torch's and the model library's import;")
    print("exit: the run record's finish to the process's end (writing the record, interpreter teardown)")
    envs = [os.environ | {"PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            for code in codes]
    rows: list[list[tuple]] = [[] for _ in codes]
    with tempfile.TemporaryDirectory() as folder:
        commands = [stage_commands(code / "tests/data/micro.yaml", Path(folder) / str(index))
                    for index, code in enumerate(codes)]
        for same_stage in zip(*commands, strict=True):  # one stage, every checkout in turn
            for index, (code, (name, args, out)) in enumerate(zip(codes, same_stage, strict=True)):
                best = None
                for _ in range(repeat):
                    wall, ended = timed([sys.executable, *args], code, envs[index])
                    facts = stage_facts(out)
                    if best is None or wall - facts["seconds"] < best[0] - best[1]["seconds"]:
                        best = (wall, facts, ended)
                wall, facts, ended = best
                exit_ = ended - moment(facts["finished"]) if "process_started" in facts else None
                rows[index].append((name, wall, facts["seconds"], facts.get("import_seconds"), exit_))
    summary = []
    for code, code_rows in zip(codes, rows, strict=True):
        print(f"\ncode: {code}")
        print(f"{'stage':11s} {'wall s':>7s} {'seconds':>8s} {'outside s':>9s} {'import s':>8s} {'exit s':>7s}")
        for name, wall, own, imported, exit_ in code_rows:
            print(f"{name:11s} {wall:7.2f} {own:8.2f} {wall - own:9.2f} {cell(imported, 8)} {cell(exit_, 7)}")
        outside = mean([wall - own for _, wall, own, _, _ in code_rows])
        exits = mean([e for *_, e in code_rows if e is not None])
        imports = [i for _, _, _, i, _ in code_rows if i is not None]
        print(f"mean per stage: outside the clock {outside:.2f} s, exit {exits:.2f} s"
              + (f", import to first work {mean(imports):.2f} s (max {max(imports):.2f} s)" if imports else ""))
        summary.append((outside, exits))
    for index in range(1, len(codes)):
        print(f"\n{codes[index]} against {codes[0]}: outside the clock x{summary[index][0] / summary[0][0]:.2f}, "
              f"exit x{summary[index][1] / summary[0][1]:.2f}")
    probe = ("import gc, sys, time; t = time.perf_counter(); sys.argv[1] == 'paused' and gc.disable(); import torch; "
             "import flowopd.models.tiny; print(f'{time.perf_counter() - t:.2f}')")
    for how in ("collector on", "paused"):
        seconds = min(float(subprocess.run([sys.executable, "-c", probe, how.split()[0]], env=envs[0],
                                           capture_output=True, text=True, check=True).stdout) for _ in range(repeat))
        print(f"import of torch and flowopd.models.tiny, {how}: {seconds:.2f} s (best of {repeat})")


def cell(value: float | None, width: int) -> str:
    return " " * width if value is None else f"{value:{width}.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    p = sub.add_parser("records", help="a finished pipeline's run records (default)")
    p.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    p.add_argument("--wall", type=float, help="wall seconds of the timed `dvc repro`")
    p = sub.add_parser("startup", help="each stage command once on the micro spec")
    p.add_argument("--code", type=Path, nargs="+", default=[ROOT],
                   help="checkouts whose flowopd/ and stages/ run, compared side by side (the first is the reference)")
    p.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "startup":
        report_startup([code.resolve() for code in args.code], args.repeat)
    else:
        report_records(getattr(args, "dvc_yaml", ROOT / "dvc.yaml"), getattr(args, "wall", None))


if __name__ == "__main__":
    main()

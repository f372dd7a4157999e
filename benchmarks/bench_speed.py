"""The compute of a main-path seed in fixed units of work, on a given base, for one checkout or two side by side.

    .venv/bin/python benchmarks/bench_speed.py [--base DIR --data DIR] [--code REV_OR_DIR ...] [--repeat 3]

Units (each a rate; the main spec's sizes, `specs/flow_opd.yaml` of the checkout measured):
    sample    ODE sampling of 256 images with the evaluation's sampler and dtype (`generate`)  images/s
    eval      the evaluation of the text task's test set (every seed; sampling + OCR)     images/s
    teacher   one teacher step (DiffusionNFT, the text teacher; first step not counted)   steps/s
    opd       one OPD step (the base as init, teachers and anchor; first step not counted)  steps/s
    sft       one SFT batch of the sft_init ablation (first batch not counted)            batches/s
    base      100 base pretraining steps (1,600 pairs rendered; bad modes from step 87)   steps/s

Each unit runs in a fresh process of the checkout (`python -c` with the checkout first on sys.path and as the working
directory), so code from before and after the package layout both run: a unit reaches the code through phase
functions and module paths tried in order (`MODULES`). With --code A B ..., the checkouts (git revisions, archived
into a scratch folder, or directories) take turns unit by unit, --repeat times; each unit's median rate is printed
with its ratio to the first checkout and the geometric mean of the ratios. Without --code, HEAD's working tree alone.
The base and data default to the newest `artifacts/base/*` and `artifacts/data/*` of this repository's `make repro`.
Threads: torch's default (both cores); run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("sample", "eval", "teacher", "opd", "sft", "base")
TIMED_STEPS = {"teacher": 3, "opd": 8, "sft": 8}  # after one untimed step
MODULES = {  # where each checkout keeps a name: the layout of today first, the flat package of before
    "load_spec": ("flowopd.spec", "flowopd.spec"),
    "generate": ("flowopd.evaluation.benchmark", "flowopd.evaluate"),
    "load_model": ("flowopd.models.loading", "flowopd.models.loading"),
    "run_eval": ("flowopd.phases.eval", "flowopd.phases"),
    "run_teacher": ("flowopd.phases.teacher", "flowopd.teachers"),
    "run_opd": ("flowopd.phases.opd", "flowopd.opd"),
    "run_base": ("flowopd.phases.base", "flowopd.phases"),
    "sft": ("flowopd.methods.sft", "flowopd.cold_start"),
    "NFTTrainer": ("flowopd.methods.nft", "flowopd.nft"),
    "OPDTrainer": ("flowopd.methods.opd_trainer", "flowopd.opd"),
}


# ---------------------------------------------------------------- one unit, inside the checkout's process
def find(name: str):
    import importlib

    for module in MODULES[name]:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    raise ImportError(f"{name} in none of {MODULES[name]}")


def with_values(spec, path: str, **values):
    """The spec with values set at a dotted path (e.g. 'teachers.text.method'), validated again."""
    data = spec.model_dump(mode="json")
    node = data
    for key in path.split("."):
        node = node[key]
    node.update(values)
    return type(spec).model_validate(data)


def timed_steps(cls, run) -> list[float]:
    """Seconds of each call of cls.step during run()."""
    original, seconds = cls.step, []

    def step(self, *args, **kwargs):
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    cls.step = step
    try:
        run()
    finally:
        cls.step = original
    return seconds


def run_unit(unit: str, base: Path, data: Path, scratch: Path) -> float:
    """The unit's rate (work per second) in this process's checkout."""
    import numpy as np
    import torch

    spec = find("load_spec")("specs/flow_opd.yaml")
    if unit == "sample":
        from types import SimpleNamespace

        lines = (data / "objects.train.jsonl").read_text().splitlines()[:256]
        prompts = [SimpleNamespace(text=json.loads(line)["text"]) for line in lines]
        bundle = find("load_model")(spec, base)
        start = time.perf_counter()
        try:  # the evaluation's precision, where the checkout has the setting
            from flowopd.models.bundle import sampling_transformer
            extra = {"transformer": sampling_transformer(bundle, spec.evaluation.dtype)}
        except (ImportError, AttributeError):
            extra = {}
        images = find("generate")(bundle, prompts, spec.evaluation.sampler, seed=0, **extra)
        assert images.shape[0] == len(prompts) == 256
        return len(prompts) / (time.perf_counter() - start)
    if unit == "eval":
        spec = with_values(spec, "evaluation", benchmarks=["text"])
        start = time.perf_counter()
        find("run_eval")(spec, base, data, "bench", scratch / "eval", progress=False)
        images = len((data / "text.test.jsonl").read_text().splitlines()) * len(spec.evaluation.seeds)
        return images / (time.perf_counter() - start)
    if unit == "teacher":
        steps = 1 + TIMED_STEPS[unit]
        spec = with_values(spec, "teachers.text.method", steps=steps, checkpoint_every=steps)
        seconds = timed_steps(find("NFTTrainer"), lambda: find("run_teacher")(
            spec, "text", base, data, scratch / "teacher", progress=False))
        return (len(seconds) - 1) / sum(seconds[1:])
    if unit == "opd":
        steps = 1 + TIMED_STEPS[unit]
        spec = with_values(spec, "opd", steps=steps, checkpoint_every=steps)
        teachers = {name: base for name in spec.teachers}
        seconds = timed_steps(find("OPDTrainer"), lambda: find("run_opd")(
            spec, base, base, teachers, data, scratch / "opd", progress=False))
        return (len(seconds) - 1) / sum(seconds[1:])
    if unit == "sft":
        steps = 1 + TIMED_STEPS[unit]
        settings = find("load_spec")("specs/ablations/sft_init.yaml").cold_start.model_copy(update={"steps": steps})
        bundle = find("load_model")(spec, base)
        texts = [json.loads(line)["text"] for line in (data / "text.train.jsonl").read_text().splitlines()]
        x0 = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (len(texts), 3, 32, 32)).astype(np.float32))
        curve = find("sft")(bundle, x0, texts, settings, seed=0, progress=False)
        return (steps - 1) / (curve[-1]["seconds"] - curve[0]["seconds"])
    if unit == "base":
        spec = with_values(spec, "base", steps=100, dataset_size=1600, bad_modes_from=87)  # the main base's share
        start = time.perf_counter()
        find("run_base")(spec, scratch / "base", progress=False)
        return 100 / (time.perf_counter() - start)
    raise ValueError(f"unknown unit {unit!r}: one of {', '.join(UNITS)}")


# ---------------------------------------------------------------- the driver
def checkout(code: str, folder: Path) -> Path:
    """A directory as it is, or a git revision archived into folder/<rev>."""
    if Path(code).is_dir():
        return Path(code).resolve()
    target = folder / code.replace("/", "_")
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", code], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def measure(tree: Path, unit: str, base: Path, data: Path) -> float:
    """Run one unit in a fresh process of the checkout at `tree`; its rate."""
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        code = (f"import sys, json; sys.argv = ['bench_speed']; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                f"import bench_speed as b; from pathlib import Path; "
                f"print('RATE', json.dumps(b.run_unit({unit!r}, Path({str(base)!r}), Path({str(data)!r}), "
                f"Path({scratch!r}))))")
        env = os.environ | {"PYTHONPATH": str(tree), "FLOWOPD_DATA_ROOTS": f"{base.parent.parent}:{scratch}",
                            "TQDM_DISABLE": "1"}
        done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                              check=False)
    rates = [line.split(None, 1)[1] for line in done.stdout.splitlines() if line.startswith("RATE ")]
    if done.returncode or not rates:
        raise SystemExit(f"{unit} failed in {tree}:\n{done.stderr[-3000:]}")
    return float(rates[-1])


def newest(folder: Path) -> Path:
    found = sorted((p for p in folder.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no artifact under {folder}: run `make repro` or pass --base and --data")
    return found[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", nargs="+", default=None, help="git revisions or directories (default: this tree)")
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--units", nargs="+", default=list(UNITS), choices=UNITS)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    base = (args.base or newest(ROOT / "artifacts/base")).resolve()
    data = (args.data or newest(ROOT / "artifacts/data")).resolve()
    print(f"base {base}\ndata {data}\nthreads: torch default; repeat {args.repeat}, interleaved", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-speed-code-") as folder:
        codes = args.code or [str(ROOT)]
        trees = [checkout(code, Path(folder)) for code in codes]
        rates: dict[tuple[str, str], list[float]] = {}
        for unit in args.units:
            for _ in range(args.repeat):
                for code, tree in zip(codes, trees):
                    rates.setdefault((unit, code), []).append(measure(tree, unit, base, data))
            line = "  ".join(f"{code}: {statistics.median(rates[unit, code]):8.3f}" for code in codes)
            print(f"{unit:8s} {line}", flush=True)
    print(f"\n{'unit':8s} " + " ".join(f"{code[:14]:>14s}" for code in codes)
          + ("".join(f" {'x ' + code[:12]:>14s}" for code in codes[1:])))
    ratios: dict[str, list[float]] = {code: [] for code in codes[1:]}
    for unit in args.units:
        medians = [statistics.median(rates[unit, code]) for code in codes]
        for code, value in zip(codes[1:], medians[1:]):
            ratios[code].append(value / medians[0])
        print(f"{unit:8s} " + " ".join(f"{m:14.3f}" for m in medians)
              + "".join(f" {v / medians[0]:14.2f}" for v in medians[1:]))
    for code, values in ratios.items():
        print(f"geometric mean of the ratios, {code} / {codes[0]}: "
              f"{math.exp(sum(map(math.log, values)) / len(values)):.2f}")


if __name__ == "__main__":
    main()

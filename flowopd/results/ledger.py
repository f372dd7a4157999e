"""The ledger: every eval shard the pipeline wrote, ingested into one DuckDB file (`reports/ledger.duckdb`).

Tables (all joined on `run_id`):
- runs:       one row per run: eval runs (one per eval shard) and the training run of the model each evaluated
              (from the model folder, linked by the eval row's `parent_run_id`); spec, git and environment, and
              `training_seed`: the seed index of the trained or evaluated model (NULL for the base and older runs);
              `split`: the prompt split an eval run scored (val or test; an eval record from before splits: test;
              NULL for training runs). The report's tables and claims read only test runs.
- benchmarks: per eval run and benchmark: headline metric, the task's normaliser (for avg), report position, n.
- metrics:    per eval run, benchmark, metric and seed: the value (n: prompts scored).
- samples:    per eval run, benchmark, seed, prompt and metric: one image's score (samples.jsonl, long format); what
              the report's bootstrap confidence intervals resample.
- curves:     per training run, step and key (loss, reward, kl, ...): the training curve (curve.csv, long format).
- artifacts:  every file of the shard and of the model folder: path, sha256, bytes, role.
- budgets:    per training run: what its phase spent (images generated, transformer forward rows, optimizer steps,
              CPU seconds) and `total_*`, with every model it descends from (the base left out), from the run
              record's `budget` (flowopd.runtime.records.budget); none for a folder from before budgets.

Run provenance (spec file, times, seconds, git, environment, the curve's timing columns) comes from the run record
beside each folder (`<folder>.run.json`, flowopd.runtime.artifacts); folders from before run records carry it in meta.json.
A run_id is a hash of the shard's content and its run record (meta.json + metrics.json + the record), so ingesting
a shard twice is a no-op, a rerun that wrote the same bytes is a new run, and the ledger keeps every run it has
seen. One writer: all shards go in one transaction, and a bad shard (named with what is wrong) stops the ingest
before the ledger is opened. A shard is bad, too, when it is not what it claims: samples.jsonl missing, a
metrics.json value that is not the mean of its samples, or a model sha256 other than the one its training recorded.
Every connection is confined to the ledger file (CONFINED): no query reads or writes another file or loads an
extension. DuckDB lets one process hold a file for
writing (no one else can even read it meanwhile): a held lock is retried a few times, then reported in one line.

duckdb and pyarrow are imported inside functions: `flowopd` start-up (`flowopd spec validate`) stays fast.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from flowopd.runtime.artifacts import sha256_file
from flowopd.runtime.records import BUDGET, run_record_path
from flowopd.spec.hashing import canonical_hash

DEFAULT_DB = Path("reports/ledger.duckdb")
LOCK_TRIES, LOCK_DELAY = 5, 0.25  # seconds before the 2nd try, doubling: 0.25 + 0.5 + 1 + 2 = 3.75 s in all
# Every connection: DuckDB touches no file but the ledger (COPY TO, read_csv, ATTACH, EXPORT are refused), installs
# and loads no extension, and a query cannot SET these back. With read_only, a query cannot change the ledger either.
CONFINED = {"enable_external_access": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "lock_configuration": True}

# Column name -> DuckDB type; the Arrow schema of the bulk inserts is derived from the same table.
TABLES: dict[str, dict[str, str]] = {
    "runs": {
        "run_id": "VARCHAR", "parent_run_id": "VARCHAR", "phase": "VARCHAR", "model": "VARCHAR",
        "spec_name": "VARCHAR", "spec_label": "VARCHAR", "spec_hash": "VARCHAR", "sections_hash": "VARCHAR",
        "model_sha256": "VARCHAR", "model_sections_hash": "VARCHAR", "git_rev": "VARCHAR", "git_dirty": "BOOLEAN",
        "python": "VARCHAR", "platform": "VARCHAR", "packages": "VARCHAR", "device": "VARCHAR",
        "started": "TIMESTAMP", "finished": "TIMESTAMP", "seconds": "DOUBLE", "shard": "VARCHAR", "meta": "VARCHAR",
        "training_seed": "INTEGER",  # the run record's seed index (docs/specs.md#training-seeds)
        "split": "VARCHAR",  # an eval run's prompt split (evaluation.split): val or test
    },
    "benchmarks": {
        "run_id": "VARCHAR", "benchmark": "VARCHAR", "position": "INTEGER", "headline": "VARCHAR",
        "normaliser": "DOUBLE", "n": "INTEGER",
    },
    "metrics": {
        "run_id": "VARCHAR", "benchmark": "VARCHAR", "metric": "VARCHAR", "seed": "INTEGER", "value": "DOUBLE",
        "n": "INTEGER",
    },
    "samples": {
        "run_id": "VARCHAR", "benchmark": "VARCHAR", "seed": "INTEGER", "prompt_index": "INTEGER", "prompt": "VARCHAR",
        "metric": "VARCHAR", "value": "DOUBLE",
    },
    "curves": {"run_id": "VARCHAR", "step": "INTEGER", "key": "VARCHAR", "value": "DOUBLE"},
    "artifacts": {"run_id": "VARCHAR", "path": "VARCHAR", "sha256": "VARCHAR", "bytes": "BIGINT", "role": "VARCHAR"},
    "budgets": {
        "run_id": "VARCHAR", "images": "BIGINT", "forwards": "BIGINT", "optimizer_steps": "BIGINT", "cpu_s": "DOUBLE",
        "total_images": "BIGINT", "total_forwards": "BIGINT", "total_optimizer_steps": "BIGINT",
        "total_cpu_s": "DOUBLE",
    },
}
# Tables filled for a run the ledger already holds when it has no rows there yet: a ledger written before the table
# existed gains the rows on the next ingest of the same shards (their run_ids are unchanged).
BACKFILL = ("samples", "budgets")
SPLITS = ("val", "test")  # evaluation.split: what an eval run scored
SAMPLE_KEYS = ("benchmark", "seed", "index", "prompt")  # the rest of a samples.jsonl row: one score per metric
MEAN_TOLERANCE = 1e-6  # metrics.json's values must be the mean of their samples (float32 rounding aside)
ROLES = {"meta.json": "meta", "spec.json": "spec", "metrics.json": "metrics", "samples.jsonl": "samples",
         "curve.csv": "curve", "model.safetensors": "weights", "model_config.json": "config"}


class LedgerError(Exception):
    """A problem reported in one line per cause (bad shards, a held lock, a bad query); never a traceback."""


# ---------------------------------------------------------------- reading shards
def _read_json(path: Path):
    if not path.is_file():
        raise LedgerError(f"{path.parent}: missing {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LedgerError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path}: unreadable ({err})") from None


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LedgerError(f"{where}: {value!r} is not a finite number")
    return float(value)


def _timestamp(value, where: str) -> datetime | None:
    """ISO time -> naive UTC (the ledger stores UTC)."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise LedgerError(f"{where}: {value!r} is not an ISO time") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def run_id_of(meta: dict, metrics: dict, run: dict | None = None) -> str:
    """Deterministic id of an eval run: the hash of its meta, metrics and run record (formatting-independent)."""
    return canonical_hash({"meta": meta, "metrics": metrics} | ({"run": run} if run is not None else {}))[:16]


def _read_run(folder: Path) -> dict | None:
    """The run record beside `folder` (None if absent); a bad one is named."""
    path = run_record_path(folder)
    if not path.is_file():
        return None
    run = _read_json(path)
    if not isinstance(run, dict):
        raise LedgerError(f"{path}: not a JSON object")
    return run


def shard_run_id(folder: str | Path) -> str:
    folder = Path(folder)
    return run_id_of(_read_json(folder / "meta.json"), _read_json(folder / "metrics.json"), _read_run(folder))


@dataclass
class Rows:
    """Column lists per table, filled shard by shard, turned into Arrow tables for one bulk insert each."""

    columns: dict[str, dict[str, list]] = field(
        default_factory=lambda: {t: {c: [] for c in cols} for t, cols in TABLES.items()})
    run_ids: set[str] = field(default_factory=set)

    def add(self, table: str, **row) -> None:
        for name, values in self.columns[table].items():
            values.append(row.get(name))

    def arrow(self) -> dict:
        import pyarrow as pa

        types = {"VARCHAR": pa.string(), "BOOLEAN": pa.bool_(), "INTEGER": pa.int32(), "BIGINT": pa.int64(),
                 "DOUBLE": pa.float64(), "TIMESTAMP": pa.timestamp("us")}
        return {
            table: pa.table(self.columns[table], schema=pa.schema([(c, types[t]) for c, t in cols.items()]))
            for table, cols in TABLES.items()
        }


def _run_row(meta: dict, run: dict | None, where: str, **extra) -> dict:
    """A runs row from a folder's meta.json and its run record (`meta` column: both, the record's keys winning)."""
    facts = meta | (run or {})
    packages = facts.get("packages")
    return {
        **{k: facts.get(k) for k in ("phase", "spec_name", "spec_label", "spec_hash", "sections_hash", "git_rev",
                                     "python", "platform", "device")},
        "git_dirty": facts.get("git_dirty") if isinstance(facts.get("git_dirty"), bool) else None,
        "packages": None if packages is None else json.dumps(packages, sort_keys=True),
        "started": _timestamp(facts.get("started"), f"{where}: started"),
        "finished": _timestamp(facts.get("finished"), f"{where}: finished"),
        "seconds": None if facts.get("seconds") is None else _number(facts["seconds"], f"{where}: seconds"),
        "meta": json.dumps(facts, sort_keys=True),
        "training_seed": _training_seed(facts.get("training_seed"), f"{where}: training_seed"),
        **extra,
    }


def _training_seed(value, where: str) -> int | None:
    if value is not None and not _whole(value):
        raise LedgerError(f"{where}: {value!r} is not a seed index (an integer >= 0)")
    return value


def _timing_points(run: dict | None, where: str) -> list[tuple[int, str, float]]:
    """The run record's curve timing (seconds, rollout_s, ...) as (step, key, value), like read_curve."""
    points = []
    for row in (run or {}).get("curve_timing") or []:
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise LedgerError(f"{where}: curve_timing: {row!r} has no integer step")
        points += [(row["step"], key, _number(value, f"{where}: curve_timing step {row['step']} {key}"))
                   for key, value in row.items() if key != "step" and value is not None]
    return points


def _add_files(rows: Rows, run_id: str, folder: Path, known: dict[str, str]) -> None:
    """One artifacts row per file of `folder` (hidden files skipped); `known` maps names to recorded sha256s."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.relative_to(folder).as_posix()
        role = ROLES.get(name) or ("grid" if name.startswith("grid_") and name.endswith(".png") else "file")
        rows.add("artifacts", run_id=run_id, path=path.as_posix(), sha256=known.get(name) or sha256_file(path),
                 bytes=path.stat().st_size, role=role)


def read_curve(path: Path) -> list[tuple[int, str, float]]:
    """curve.csv -> (step, key, value) for every non-empty cell of every column but `step`."""
    points = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise LedgerError(f"{path}: no `step` column (columns: {reader.fieldnames})")
        keys = [k for k in reader.fieldnames if k != "step"]
        for line, record in enumerate(reader, start=2):
            try:
                step = float(record["step"])
                if not step.is_integer():
                    raise ValueError
                for key in keys:
                    if record[key] not in ("", None):
                        points.append((int(step), key, float(record[key])))
            except (TypeError, ValueError):
                raise LedgerError(f"{path}:{line}: not a number in {dict(record)}") from None
    return points


def _add_training_run(rows: Rows, model_dir: Path, label: str) -> str | None:
    """The run that trained the evaluated model (its folder's meta.json and curve.csv); None if the folder is gone."""
    if not (model_dir / "meta.json").is_file():
        print(f"note: model folder {model_dir} not found: no training run or curves recorded for it", file=sys.stderr)
        return None
    meta = _read_json(model_dir / "meta.json")
    if not isinstance(meta, dict):
        raise LedgerError(f"{model_dir}/meta.json: not a JSON object")
    curve_path = model_dir / "curve.csv"
    curve = read_curve(curve_path) if curve_path.is_file() else []
    run = _read_run(model_dir)
    run_id = canonical_hash({"meta": meta, "curve": curve} | ({"run": run} if run is not None else {}))[:16]
    if run_id in rows.run_ids:
        return run_id
    rows.run_ids.add(run_id)
    rows.add("runs", **_run_row(meta, run, f"{model_dir}/meta.json", run_id=run_id, model=label,
                                model_sha256=meta.get("weights_sha256"), shard=model_dir.as_posix()))
    for step, key, value in curve + _timing_points(run, run_record_path(model_dir).as_posix()):
        rows.add("curves", run_id=run_id, step=step, key=key, value=value)
    _add_files(rows, run_id, model_dir, {"model.safetensors": meta.get("weights_sha256")})
    _add_budget(rows, run_id, (run or {}).get("budget"), run_record_path(model_dir).as_posix())
    return run_id


def _budget_counts(counts: dict, where: str) -> dict:
    """Images, forward rows and optimizer steps (whole numbers) and CPU seconds, each checked."""
    checked = {}
    for key in BUDGET:
        value = _number(counts.get(key), f"{where}.{key}")
        if value < 0 or (key != "cpu_s" and not value.is_integer()):
            raise LedgerError(f"{where}.{key}: {counts[key]!r} is not a count")
        checked[key] = value if key == "cpu_s" else int(value)
    return checked


def _add_budget(rows: Rows, run_id: str, budget, where: str) -> None:
    """A training run's budgets row from its run record's `budget`: none without one (a folder from before
    budgets), null totals when the record does not know them (a parent from before budgets)."""
    if budget is None:
        return
    if not isinstance(budget, dict) or not isinstance(budget.get("total"), dict | None):
        raise LedgerError(f"{where}: budget: not a mapping of counts whose `total` is one too (or null)")
    own = _budget_counts(budget, f"{where}: budget")
    total = {} if budget.get("total") is None else _budget_counts(budget["total"], f"{where}: budget.total")
    rows.add("budgets", run_id=run_id, **own, **{f"total_{key}": value for key, value in total.items()})


def _check_metrics(record, where: str) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("benchmarks"), dict) or not record["benchmarks"]:
        raise LedgerError(f"{where}: no `benchmarks` mapping")
    for task, bench in record["benchmarks"].items():
        at = f"{where}: benchmarks.{task}"
        if not isinstance(bench, dict) or not isinstance(bench.get("metrics"), dict) or not bench["metrics"]:
            raise LedgerError(f"{at}: no `metrics` mapping")
        if bench.get("headline") not in bench["metrics"]:
            raise LedgerError(f"{at}.headline: {bench.get('headline')!r} is not one of its metrics")
        if isinstance(bench.get("n"), bool) or not isinstance(bench.get("n"), int):
            raise LedgerError(f"{at}.n: {bench.get('n')!r} is not an integer")
        for metric, stats in bench["metrics"].items():
            seeds = stats.get("seeds") if isinstance(stats, dict) else None
            if not isinstance(seeds, dict) or not seeds:
                raise LedgerError(f"{at}.metrics.{metric}: no `seeds` mapping")
            if not all(seed.isdigit() and type(v) in (int, float) and math.isfinite(v) for seed, v in seeds.items()):
                for seed, value in seeds.items():  # name the bad entry
                    if not seed.isdigit():
                        raise LedgerError(f"{at}.metrics.{metric}.seeds: {seed!r} is not a seed number")
                    _number(value, f"{at}.metrics.{metric}.seeds.{seed}")
    return record


def _split(meta: dict, record: dict, folder: Path) -> str:
    """The prompt split an eval shard scored: meta.json's, which metrics.json must not contradict; a shard from
    before splits names none and scored the test prompts."""
    split = meta.get("split", record.get("split", "test"))
    if split not in SPLITS:
        where = "meta.json" if "split" in meta else "metrics.json"
        raise LedgerError(f"{folder}/{where}: split: {split!r} is not one of {', '.join(SPLITS)}")
    if record.get("split", split) != split:
        raise LedgerError(f"{folder}/metrics.json: split {record['split']!r} is not meta.json's {split!r}")
    return split


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_samples(path: Path, record: dict) -> list[tuple]:
    """samples.jsonl -> (benchmark, seed, prompt index, prompt, metric, value), one per metric a row scores.

    Only the metrics metrics.json lists for the row's benchmark are read (other keys, such as a decoded text, are
    skipped); a boolean (a per-sample flag) counts as 0 or 1. Every evaluation writes the file: a shard without it
    is refused (its metrics could not be checked)."""
    if not path.is_file():
        raise LedgerError(f"{path.parent}: missing {path.name} (the scores its metrics.json is checked against)")
    samples, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LedgerError(f"{where}: not valid JSON ({err.msg})") from None
            bench = record["benchmarks"].get(row.get("benchmark")) if isinstance(row, dict) else None
            if bench is None:
                raise LedgerError(f"{where}: not a sample of a benchmark in metrics.json")
            key = tuple(row.get(k) for k in SAMPLE_KEYS)
            benchmark, seed, index, prompt = key
            if not _whole(seed) or str(seed) not in bench["metrics"][bench["headline"]]["seeds"]:
                raise LedgerError(f"{where}: seed {seed!r} is not one of metrics.json's seeds for {benchmark}")
            if not _whole(index) or not isinstance(prompt, str):
                raise LedgerError(f"{where}: needs a prompt `index` (an integer >= 0) and its `prompt` text")
            if (benchmark, seed, index) in seen:
                raise LedgerError(f"{where}: a second sample of {benchmark} prompt {index} seed {seed}")
            seen.add((benchmark, seed, index))
            for metric in (m for m in bench["metrics"] if m in row):
                value = row[metric]
                if type(value) is not float or not math.isfinite(value):  # the common case checked first
                    value = float(value) if isinstance(value, bool) else _number(value, f"{where}: {metric}")
                samples.append((benchmark, seed, index, prompt, metric, value))
    return samples


def check_samples(folder: Path, record: dict, samples: list[tuple]) -> None:
    """metrics.json must be what samples.jsonl says: per benchmark, metric and seed, `n` scores whose mean is the
    recorded value, and each metric's `mean` the mean over its seeds; otherwise the shard is refused."""
    sums: dict[tuple, list] = {}  # (benchmark, metric, seed) -> [count, total]
    for benchmark, seed, _, _, metric, value in samples:
        cell = sums.setdefault((benchmark, metric, seed), [0, 0.0])
        cell[0] += 1
        cell[1] += value
    for task, bench in record["benchmarks"].items():
        for metric, stats in bench["metrics"].items():
            at = f"{folder}/metrics.json: benchmarks.{task}.metrics.{metric}"
            for seed, value in stats["seeds"].items():
                count, total = sums.get((task, metric, int(seed)), (0, 0.0))
                if count != bench["n"]:
                    raise LedgerError(f"{at}.seeds.{seed}: n is {bench['n']} prompts, samples.jsonl scores {count}")
                if not math.isclose(total / count, value, rel_tol=MEAN_TOLERANCE, abs_tol=MEAN_TOLERANCE):
                    raise LedgerError(f"{at}.seeds.{seed} is {value!r}, its {count} scores in samples.jsonl average "
                                      f"{total / count!r}")
            mean = math.fsum(stats["seeds"].values()) / len(stats["seeds"])
            recorded = _number(stats.get("mean", mean), f"{at}.mean")
            if not math.isclose(recorded, mean, rel_tol=MEAN_TOLERANCE, abs_tol=MEAN_TOLERANCE):
                raise LedgerError(f"{at}.mean is {recorded!r}, its seeds average {mean!r}")


def check_lineage(folder: Path, meta: dict, model_dir: Path | None) -> None:
    """The evaluated weights must be the ones their training phase recorded: the sha256 the evaluation hashed
    against the one it read from the model's meta.json then, and against the model folder's meta.json now."""
    where = f"{folder}/meta.json"
    if "model_recorded_sha256" in meta and meta["model_recorded_sha256"] != meta.get("model_sha256"):
        raise LedgerError(f"{where}: model_sha256 {meta.get('model_sha256')} is not model_recorded_sha256 "
                          f"{meta['model_recorded_sha256']}: the evaluated weights are not the trained ones")
    if model_dir is None or not (model_dir / "meta.json").is_file():
        return  # the folder is gone: _add_training_run notes it
    trained = _read_json(model_dir / "meta.json")
    trained = trained if isinstance(trained, dict) else {}
    for evaluated, recorded in (("model_sha256", "weights_sha256"), ("model_sections_hash", "sections_hash")):
        if meta.get(evaluated) != trained.get(recorded):
            raise LedgerError(f"{where}: {evaluated} {meta.get(evaluated)} is not the {recorded} "
                              f"{trained.get(recorded)} of {model_dir}/meta.json: not the model its lineage records")


def read_shard(rows: Rows, folder: str | Path) -> str:
    """Add one eval shard (and its model's training run) to `rows`; returns its run_id. Raises LedgerError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LedgerError(f"{folder}: no such shard folder")
    meta = _read_json(folder / "meta.json")
    if not isinstance(meta, dict):
        raise LedgerError(f"{folder}/meta.json: not a JSON object")
    if meta.get("phase") != "eval":
        raise LedgerError(f"{folder}/meta.json: phase is {meta.get('phase')!r}, not an eval shard")
    run = _read_run(folder)
    facts = meta | (run or {})
    for key in ("model", "spec_hash", "spec_name"):
        if not isinstance(facts.get(key), str) or not facts[key]:
            if key != "model" and run is None:
                raise LedgerError(f"{run_record_path(folder)}: missing (the run record names the shard's spec)")
            where = f"{folder}/meta.json" if key == "model" else run_record_path(folder)
            raise LedgerError(f"{where}: {key}: missing")
    record = _check_metrics(_read_json(folder / "metrics.json"), f"{folder}/metrics.json")
    split = _split(meta, record, folder)
    samples = read_samples(folder / "samples.jsonl", record)
    check_samples(folder, record, samples)
    spec = _read_json(folder / "spec.json")
    spec = spec if isinstance(spec, dict) else {}
    tasks = spec.get("tasks") if isinstance(spec.get("tasks"), dict) else {}
    evaluation = spec.get("evaluation") if isinstance(spec.get("evaluation"), dict) else {}
    order = evaluation.get("benchmarks")
    order = list(order) if isinstance(order, list) else sorted(record["benchmarks"])
    run_id = run_id_of(meta, record, run)
    if run_id in rows.run_ids:  # the same shard twice in one call
        return run_id
    benchmark_rows = []
    for task, bench in record["benchmarks"].items():
        normaliser = tasks[task].get("normaliser") if isinstance(tasks.get(task), dict) else None
        normaliser = _number(normaliser, f"{folder}/spec.json: tasks.{task}.normaliser")
        if normaliser <= 0:
            raise LedgerError(f"{folder}/spec.json: tasks.{task}.normaliser: {normaliser} is not positive")
        position = order.index(task) if task in order else len(order)
        benchmark_rows.append({"run_id": run_id, "benchmark": task, "position": position,
                               "headline": bench["headline"], "normaliser": normaliser, "n": bench["n"]})
    model_dir = meta.get("model_dir")
    check_lineage(folder, meta, Path(model_dir) if isinstance(model_dir, str) else None)
    parent = _add_training_run(rows, Path(model_dir), meta["model"]) if isinstance(model_dir, str) else None
    rows.run_ids.add(run_id)
    rows.add("runs", **_run_row(meta, run, f"{folder}/meta.json", run_id=run_id, parent_run_id=parent,
                                model=meta["model"], model_sha256=meta.get("model_sha256"),
                                model_sections_hash=meta.get("model_sections_hash"), shard=folder.as_posix(),
                                split=split))
    for row in benchmark_rows:
        rows.add("benchmarks", **row)
    metrics = rows.columns["metrics"]  # column by column: a shard holds tasks x metrics x seeds values
    for task, bench in record["benchmarks"].items():
        for metric, stats in bench["metrics"].items():
            seeds = stats["seeds"]
            for column, value in (("run_id", run_id), ("benchmark", task), ("metric", metric), ("n", bench["n"])):
                metrics[column] += [value] * len(seeds)
            metrics["seed"] += map(int, seeds)
            metrics["value"] += map(float, seeds.values())
    columns = rows.columns["samples"]
    columns["run_id"] += [run_id] * len(samples)
    for column, values in zip(("benchmark", "seed", "prompt_index", "prompt", "metric", "value"), zip(*samples)):
        columns[column] += values
    _add_files(rows, run_id, folder, {})
    return run_id


def collect(shards: list[str | Path]) -> Rows:
    """Read every shard; if any is bad, raise one LedgerError naming each bad shard (one line each)."""
    rows, problems = Rows(), []
    for shard in shards:
        try:
            read_shard(rows, shard)
        except LedgerError as err:
            problems.append(str(err))
    if problems:
        raise LedgerError("\n".join(problems))
    return rows


# ---------------------------------------------------------------- the database
def _lock_holder(message: str) -> str:
    pid = re.search(r"\(PID (\d+)\)", message)
    return f" (PID {pid.group(1)})" if pid else ""


@contextlib.contextmanager
def connect(db: str | Path = DEFAULT_DB, read_only: bool = False, tries: int | None = None,
            delay: float | None = None):
    """A DuckDB connection confined to the ledger file (CONFINED); a lock held by another process is retried `tries`
    times with doubling waits."""
    import duckdb

    tries, delay = tries or LOCK_TRIES, LOCK_DELAY if delay is None else delay
    db = Path(db)
    if read_only and not db.is_file():
        raise LedgerError(f"no ledger at {db}: ingest eval shards first (`flowopd ledger ingest SHARD...`)")
    if not read_only:
        db.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(tries):
        try:
            con = duckdb.connect(str(db), read_only=read_only, config=CONFINED)
            break
        except duckdb.IOException as err:
            if "Could not set lock" not in str(err):
                raise LedgerError(f"{db}: {str(err).splitlines()[0]}") from None
            if attempt == tries - 1:
                raise LedgerError(f"{db} is in use by another process{_lock_holder(str(err))}; gave up after "
                                  f"{tries} tries over {delay * (2 ** (tries - 1) - 1):.2f} s") from None
            time.sleep(delay * 2**attempt)
        except duckdb.Error as err:
            raise LedgerError(f"{db}: {str(err).splitlines()[0]}") from None
    try:
        yield con
    finally:
        con.close()


def create_tables(con) -> None:
    for table, cols in TABLES.items():
        key = " PRIMARY KEY" if table == "runs" else ""
        body = ", ".join(f"{c} {t}{key if c == 'run_id' else ''}" for c, t in cols.items())
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body})")
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS training_seed INTEGER")  # a ledger from before seeds
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS split VARCHAR")  # before splits (NULL: test, see tables)


def _rollback(con) -> None:
    import duckdb

    with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended the transaction
        con.execute("ROLLBACK")


def insert(con, tables: dict) -> list[str]:
    """Bulk-insert Arrow tables in one transaction, only rows of runs the ledger lacks; returns the new run_ids."""
    import duckdb

    create_tables(con)
    con.execute("BEGIN TRANSACTION")
    try:
        for name, table in tables.items():
            con.register(f"incoming_{name}", table)
        con.execute("CREATE OR REPLACE TEMP TABLE fresh AS SELECT DISTINCT run_id FROM incoming_runs "
                    "WHERE run_id NOT IN (SELECT run_id FROM runs)")
        for name in tables:
            columns = ", ".join(TABLES[name])
            wanted = f"(SELECT run_id FROM fresh UNION SELECT run_id FROM runs WHERE run_id NOT IN " \
                     f"(SELECT run_id FROM {name}))" if name in BACKFILL else "(SELECT run_id FROM fresh)"
            con.execute(f"INSERT INTO {name} ({columns}) SELECT {columns} FROM incoming_{name} "
                        f"WHERE run_id IN {wanted}")
        fresh = [r[0] for r in con.execute("SELECT run_id FROM fresh ORDER BY run_id").fetchall()]
        con.execute("DROP TABLE fresh")
        con.execute("COMMIT")
    except duckdb.Error as err:
        _rollback(con)
        raise LedgerError(f"ingest failed, ledger unchanged: {str(err).splitlines()[0]}") from None
    except BaseException:
        _rollback(con)
        raise
    finally:
        for name in tables:
            con.unregister(f"incoming_{name}")
    return fresh


def ingest(shards: list[str | Path], db: str | Path = DEFAULT_DB, tries: int | None = None,
           delay: float | None = None) -> tuple[list[str], list[str]]:
    """Ingest eval shards; returns (new eval run_ids, eval run_ids already there). Bad shards: LedgerError."""
    rows = collect(shards)
    eval_ids = [r for r, phase in zip(rows.columns["runs"]["run_id"], rows.columns["runs"]["phase"])
                if phase == "eval"]
    with connect(db, tries=tries, delay=delay) as con:
        fresh = set(insert(con, rows.arrow()))
    return [r for r in eval_ids if r in fresh], [r for r in eval_ids if r not in fresh]


def query(sql: str, db: str | Path = DEFAULT_DB, tries: int | None = None, delay: float | None = None):
    """(column names, rows) of a query on the ledger opened read-only."""
    import duckdb

    with connect(db, read_only=True, tries=tries, delay=delay) as con:
        try:
            result = con.execute(sql)
            if result.description is None:
                return [], []
            return [d[0] for d in result.description], result.fetchall()
        except duckdb.Error as err:
            raise LedgerError(str(err).splitlines()[0]) from None

"""Paper tables from the ledger as Polars DataFrames: the numbers and intervals `reports/` shows, computed once.

The report stage renders these frames (Markdown, CSV, LaTeX: `flowopd.results.formats`); a notebook uses them as they are:

    from flowopd.results import tables
    tables.sql("SELECT model, count(*) AS runs FROM runs GROUP BY model")   # any query, the ledger read-only
    tables.main_table()                                     # the latest eval run of every row, main evaluation
    tables.main_table(rows=["teacher:*", "flow_opd", "specs/ablations/*.yaml"], columns=["text", "avg"])
    tables.main_table(rows=["specs/ablations/*.yaml"], against="flow_opd")    # paired differences
    tables.mar_table(); tables.exploit_table()
    claims.claims(); compare.compare_frame("specs/a.yaml", "specs/b.yaml")   # flowopd.results.claims, .compare

A cell is the mean over a row's training seeds of each trained model's mean over prompt rows and evaluation seeds
(for one model: the mean over seeds of metrics.json's values); `<column>_lo` / `<column>_hi` bound its 95% bootstrap
interval (`flowopd.results.bootstrap`: training seeds resampled, then distinct prompt texts with all their rows and
seeds; paired across rows evaluated on the same prompts and seeds), null where the ledger holds no per-sample scores.
`n_seeds` counts a row's training seeds, `n_prompts` the distinct test prompts of its tasks (the smallest);
`train_images` / `train_cpu_s`: what its model cost to train, its lineage included (flowopd.results.budgets).
`rows` entries are label globs (`teacher:*`) or spec globs (`specs/ablations/*.yaml`: each spec's label), in the
order given; a label without results is a row of nulls (and a note on stderr), so a table never hides it.

A row is a label under one evaluation setting (the eval sub-spec's hash), holding one model per training seed
(`runs.training_seed`; NULL, or a ledger without the column, counts as seed 0): an ablation that changes only
`evaluation` adds rows of its own setting instead of replacing others. The tables and claims show the main
setting's rows (the setting with the most rows); `load_groups` gives every setting. Only evaluations of the test
prompts make rows (`runs.split` test; NULL, or a ledger without the column, is from before splits: test): a `val`
evaluation (evaluation.split, for tuning) never enters a table, a claim or a comparison; `row_groups(..., "val")`
gives the validation rows, which only the validation table shows (flowopd.results.validation_table).
"""

from __future__ import annotations

import fnmatch
import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from flowopd.results import bootstrap
from flowopd.results.bootstrap import Design, Estimate, Training
from flowopd.results.budgets import row_budgets
from flowopd.results.ledger import DEFAULT_DB, MEAN_TOLERANCE, SPLITS, LedgerError, connect, shard_run_id

EXPLOIT_METRIC = "prompt_ignoring"  # share of samples a detector flags as ignoring the prompt, per benchmark

# The queries below read a run's training seed as {seed} (training_seed_sql: the column where the ledger has it) and
# its prompt split as {split} (split_sql).
# Headline values of the wanted eval runs, one row per (run, benchmark, seed).
HEADLINE_SQL = """
SELECT r.run_id, r.model, {seed} AS training_seed, r.finished, r.parent_run_id, r.shard, r.spec_name, r.spec_hash,
       r.git_rev, r.git_dirty, r.sections_hash AS evaluation, b.benchmark, b.position, b.headline, b.normaliser, b.n,
       m.seed, m.value
FROM runs r
JOIN benchmarks b ON b.run_id = r.run_id
JOIN metrics m ON m.run_id = b.run_id AND m.benchmark = b.benchmark AND m.metric = b.headline
WHERE r.phase = 'eval' AND r.run_id IN (SELECT run_id FROM wanted)
"""
# A report row is a label under one evaluation setting (the eval sub-spec's hash), one model (lineage: the model
# artifact's hash) per training seed. The latest eval run of every (label, training seed, lineage, setting), among
# all runs or those of one spec (hash), oldest first.
LINEAGE = "coalesce(r.model_sections_hash, r.model_sha256, r.run_id)"
LATEST_SQL = f"""
SELECT r.run_id FROM runs r WHERE r.phase = 'eval' AND {{split}} = 'test' AND (? IS NULL OR r.spec_hash = ?)
QUALIFY row_number() OVER (PARTITION BY r.model, {{seed}}, {LINEAGE}, r.sections_hash
                           ORDER BY r.finished DESC NULLS LAST, r.run_id) = 1
ORDER BY r.finished NULLS FIRST, r.run_id
"""
ROWS_SQL = f"""
SELECT r.run_id, r.model, {{seed}} AS training_seed, {LINEAGE} AS lineage, r.sections_hash AS evaluation,
       r.spec_name, r.shard, r.finished
FROM runs r WHERE r.phase = 'eval' AND {{split}} = {{rows_split}} AND r.run_id IN (SELECT run_id FROM wanted)
ORDER BY r.finished NULLS FIRST, r.run_id
"""
# Every metric of the wanted eval runs: each run's mean over evaluation seeds, then the mean over a row's runs (its
# training seeds).
MEANS_SQL = """
SELECT model, benchmark, metric, avg(mean) AS mean FROM (
    SELECT r.model, r.run_id, m.benchmark, m.metric, avg(m.value) AS mean
    FROM runs r JOIN metrics m ON m.run_id = r.run_id
    WHERE r.run_id IN (SELECT run_id FROM wanted)
    GROUP BY r.model, r.run_id, m.benchmark, m.metric)
GROUP BY model, benchmark, metric
"""
SAMPLES_SQL = """
SELECT r.model, {seed} AS training_seed, s.benchmark, s.metric, s.seed, s.prompt_index, s.prompt, s.value
FROM runs r JOIN samples s ON s.run_id = r.run_id
WHERE r.run_id IN (SELECT run_id FROM wanted)
ORDER BY r.model, s.benchmark, s.metric, training_seed, s.prompt_index, s.seed
"""


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def model_order(label: str) -> tuple:
    """Report row order: base, teacher:* sorted, mixed_grpo and mixed_grpo:* sorted, flow_opd, flow_opd:* sorted,
    anything else sorted."""
    group = {"base": 0, "mixed_grpo": 2, "flow_opd": 3}.get(label)
    if group is None:
        prefixes = {"teacher:": 1, "mixed_grpo:": 2, "flow_opd:": 4}
        group = next((g for prefix, g in prefixes.items() if label.startswith(prefix)), 5)
    return (group, label)


def sql(query: str, db: str | Path = DEFAULT_DB, params: list | None = None) -> pl.DataFrame:
    """Any SQL on the ledger as a Polars DataFrame; the ledger is opened read-only (a held lock is retried)."""
    import duckdb

    with connect(db, read_only=True) as con:
        try:
            return con.sql(query, params=params).pl()
        except duckdb.Error as err:
            raise LedgerError(str(err).splitlines()[0]) from None


def _runs_column_or(con, column: str, default: str, alias: str = "r") -> str:
    """`column` of runs in SQL, NULL read as `default` (an SQL literal); `default` in a ledger written before the
    column existed."""
    columns = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'").fetchall()
    return f"coalesce({alias}.{column}, {default})" if (column,) in columns else default


def training_seed_sql(con, alias: str = "r") -> str:
    """A run's training seed in SQL: the `runs.training_seed` column (NULL: 0) where the ledger has it; 0 in a
    ledger written before the column existed."""
    return _runs_column_or(con, "training_seed", "0", alias)


def split_sql(con, alias: str = "r") -> str:
    """An eval run's prompt split in SQL: `runs.split`; NULL or no column (from before splits): 'test'."""
    return _runs_column_or(con, "split", "'test'", alias)


def _fill(con, query: str) -> str:
    """The query with {seed} and {split} read from run `r`."""
    for key, column in (("{seed}", training_seed_sql), ("{split}", split_sql)):
        if key in query:
            query = query.replace(key, column(con))
    return query


def query_runs(con, query: str, run_ids: list[str]) -> pl.DataFrame:
    """A query whose `wanted` table holds `run_ids`; `{seed}` / `{split}` in it read run `r`'s training seed and
    prompt split."""
    query = _fill(con, query)
    con.register("wanted", pl.DataFrame({"run_id": run_ids}, schema={"run_id": pl.String}))
    try:
        return con.sql(query).pl()
    finally:
        con.unregister("wanted")


def row_groups(con, run_ids: list[str], split: str = "test") -> list[list[str]]:
    """The runs of every report row, grouped by evaluation setting: the main setting (most rows; a tie: the one
    listed first) first. A row is a label under one setting, holding one run per training seed; of the runs of one
    (label, training seed) the latest is kept. Under one setting a label and training seed name one model: two from
    different specs are refused, an older one of the same spec (the spec was edited since) is left out with a note.
    Only runs of the prompt `split` count (test: the report's tables; val: the validation table)."""
    if split not in SPLITS:
        raise LedgerError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    rows_sql = ROWS_SQL.replace("{rows_split}", f"'{split}'")  # one of SPLITS: a safe literal
    groups: dict[str, dict[tuple[str, int], dict]] = {}  # evaluation -> (label, training seed) -> its run
    for run in query_runs(con, rows_sql, run_ids).iter_rows(named=True):  # oldest first: the latest wins
        models = groups.setdefault(run["evaluation"], {})
        key = (run["model"], run["training_seed"])
        other = models.get(key)
        seed = f" and training seed {key[1]}" if key[1] else ""
        if other is not None and other["spec_name"] != run["spec_name"]:
            raise LedgerError(f"two models labelled {run['model']!r}{seed} under one evaluation: spec "
                              f"{other['spec_name']} ({other['shard']}) and spec {run['spec_name']} ({run['shard']}); "
                              "give each its own label")
        if other is not None:
            note(f"{run['model']}: run {other['run_id']} is older than another current run of that label{seed} and "
                 "evaluation; not in the table")
        models[key] = run
    listed = {run_id: i for i, run_id in reversed(list(enumerate(run_ids)))}

    def rows(models: dict) -> int:
        return len({label for label, _ in models})

    order = sorted(groups.values(), key=lambda m: (-rows(m), min(listed[r["run_id"]] for r in m.values())))
    return [[run["run_id"] for run in models.values()] for models in order]


def _cell(benchmark: str, group: pl.DataFrame) -> tuple[Design, Training, np.ndarray] | None:
    """A cell's prompt design, training seeds and means per (training seed, distinct prompt text) over the text's
    rows and evaluation seeds; None unless every training seed has every prompt row x evaluation seed."""
    rows = group.select("prompt_index", "prompt").unique()
    seeds = sorted(group["seed"].unique().to_list())
    training = sorted(group["training_seed"].unique().to_list())
    complete = group.select("training_seed", "prompt_index", "seed").n_unique() == group.height
    if (not complete or rows["prompt_index"].n_unique() != rows.height
            or group.height != rows.height * len(seeds) * len(training)):
        return None
    per_text = rows.group_by("prompt").len().sort("prompt")
    means = (group.group_by("training_seed", "prompt").agg(pl.col("value").mean()).sort("training_seed", "prompt")
             ["value"].to_numpy().reshape(len(training), per_text.height))
    design = Design(benchmark, tuple(per_text["prompt"]), tuple(per_text["len"]), tuple(seeds))
    return design, Training(tuple(training)), means


def sample_estimates(samples: pl.DataFrame, means: pl.DataFrame) -> dict[tuple[str, str, str], Estimate]:
    """(model, benchmark, metric) -> bootstrap Estimate, for cells whose samples agree with their mean."""
    cells = {}
    for (model, benchmark, metric), group in samples.group_by("model", "benchmark", "metric", maintain_order=True):
        cell = _cell(benchmark, group)
        if cell is None:
            note(f"{model}: {benchmark}.{metric}: samples do not cover every prompt x seed; no interval")
        else:
            cells[(model, benchmark, metric)] = cell
    expected = {(m, b, k): v for m, b, k, v in means.iter_rows()}
    estimates = {}
    for key, estimate in bootstrap.estimate(cells).items():
        if key in expected and abs(estimate.mean - expected[key]) <= MEAN_TOLERANCE * max(1.0, abs(expected[key])):
            estimates[key] = estimate
        else:
            note(f"{key[0]}: {key[1]}.{key[2]}: samples average {estimate.mean:.6g}, not the recorded "
                 f"{expected.get(key)}; no interval")
    return estimates


@dataclass
class Results:
    """The current eval runs, loaded once: headline values, every metric's mean, bootstrap estimates."""

    values: pl.DataFrame  # headline value per model, run (training seed), benchmark, seed (with run provenance)
    means: pl.DataFrame  # model, benchmark, metric, mean over training seeds of the mean over seeds: every metric
    estimates: dict[tuple[str, str, str], Estimate]
    prompts: pl.DataFrame | None = None  # model, benchmark, prompts (distinct texts), rows, seeds: per-sample scores
    budgets: pl.DataFrame | None = None  # model, train_images, train_cpu_s: per trained model (mean over seeds)
    samples: pl.DataFrame | None = None  # per-sample scores (SAMPLES_SQL's columns): what the rescue claim counts

    def __post_init__(self):
        bench = self.values.group_by("benchmark").agg(pl.col("position").min(), pl.col("headline", "normaliser")
                                                      .first()).sort("position", "benchmark")
        self.tasks = bench["benchmark"].to_list()
        self.headline = dict(zip(self.tasks, bench["headline"]))
        self.normaliser = dict(zip(self.tasks, bench["normaliser"]))
        self.models = sorted(set(self.means["model"].to_list()) | set(self.values["model"]), key=model_order)
        self._mean = {(m, b, k): v for m, b, k, v in self.means.iter_rows()}
        seeds = self.values.group_by("model").agg(pl.col("training_seed").n_unique())
        self._seeds = dict(seeds.iter_rows())
        self._prompts = {} if self.prompts is None else {(m, b): p for m, b, p in
                                                          self.prompts.select("model", "benchmark", "prompts").iter_rows()}
        self._budgets = {} if self.budgets is None else {m: (i, c) for m, i, c in self.budgets.iter_rows()}

    # ------------------------------------------------------------ cells
    def mean(self, model: str, column: str, metric: str | None = None) -> float | None:
        """A task's headline mean (or `metric`'s), or avg = mean over tasks of mean / normaliser."""
        if column == "avg" and metric is None:
            parts = [self.mean(model, t) for t in self.tasks]
            if not parts or None in parts:
                return None
            return sum(p / self.normaliser[t] for p, t in zip(parts, self.tasks)) / len(self.tasks)
        return self._mean.get((model, column, metric or self.headline.get(column)))

    def estimate(self, model: str, column: str, metric: str | None = None) -> Estimate | None:
        if column == "avg" and metric is None:
            parts = [self.estimate(model, t) for t in self.tasks]
            if not parts or None in parts:
                return None
            return Estimate.average(parts, [1 / (len(self.tasks) * self.normaliser[t]) for t in self.tasks])
        return self.estimates.get((model, column, metric or self.headline.get(column)))

    def difference(self, a: str, b: str, column: str, metric: str | None = None) -> Estimate | None:
        """a - b with bootstrap draws (paired where a and b share prompts and seeds); None if either lacks them."""
        ea, eb = self.estimate(a, column, metric), self.estimate(b, column, metric)
        return None if ea is None or eb is None else ea - eb

    def n_seeds(self, model: str) -> int | None:
        """The training seeds (trained models) of a row."""
        return self._seeds.get(model)

    def budget(self, model: str) -> tuple[int | None, float | None]:
        """(train_images, train_cpu_s) of a row's trained model, its lineage included (flowopd.results.budgets);
        the mean over its training seeds; None where the ledger does not know."""
        return self._budgets.get(model, (None, None))

    def n_prompts(self, model: str, column: str = "avg") -> int | None:
        """Distinct test prompts of a task, or for avg the smallest over the row's tasks; None without per-sample
        scores."""
        counts = [self._prompts.get((model, t)) for t in (self.tasks if column == "avg" else [column])]
        counts = [c for c in counts if c is not None]
        return min(counts) if counts else None

    # ------------------------------------------------------------ rows and columns
    def select(self, rows: list[str] | None, exclude: tuple[str, ...] = ()) -> list[str]:
        """Model labels in the order asked: label globs and spec globs (`*.yaml`: each spec's label)."""
        if rows is None:
            return [m for m in self.models if m not in exclude]
        chosen: list[str] = []
        for entry in rows:
            if entry.endswith((".yaml", ".yml")):
                labels = spec_labels(entry)
            else:
                labels = [m for m in self.models if fnmatch.fnmatchcase(m, entry)]
                if not labels and not any(c in entry for c in "*?["):
                    labels = [entry]
                if not labels:
                    note(f"no model label matches {entry!r}")
            for label in labels:
                if label not in self.models:
                    note(f"{label}: no results in the ledger; its row is empty")
                if label not in chosen:
                    chosen.append(label)
        return chosen

    def cell(self, model: str, column: str, metric: str | None = None, against: str | None = None) -> tuple:
        """(mean, lo, hi) of a cell, or of model - `against` with its paired interval; None where missing."""
        value, estimate = self.mean(model, column, metric), self.estimate(model, column, metric)
        if against is not None:
            base = self.mean(against, column, metric)
            value = None if value is None or base is None else value - base
            estimate = self.difference(model, against, column, metric)
        return (value, *(bootstrap.interval(estimate.draws) if estimate is not None else (None, None)))

    def _frame(self, models: list[str], columns: list[tuple[str, str, str | None]], against: str | None = None):
        """columns: (name, benchmark or 'avg', metric or None for the headline) -> name, name_lo, name_hi."""
        data: dict[str, list] = {"model": models}
        for name, column, metric in columns:
            cells = [self.cell(model, column, metric, against) for model in models]
            for suffix, values in zip(("", "_lo", "_hi"), zip(*cells) if cells else ([], [], [])):
                data[name + suffix] = list(values)
        return pl.DataFrame(data, schema={"model": pl.String} | {c: pl.Float64 for c in list(data)[1:]})

    # ------------------------------------------------------------ the tables
    def main_table(self, rows: list[str] | None = None, columns: list[str] | None = None,
                   against: str | None = None) -> pl.DataFrame:
        """model, then per task and avg: mean, _lo, _hi; then the row's n_seeds and n_prompts. `against`: each row
        minus that row (paired intervals)."""
        available = [*self.tasks, "avg"]
        columns = columns or available
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise LedgerError(f"no column {', '.join(unknown)}; the table has {', '.join(available)}")
        models = self.select(rows, exclude=(against,) if against else ())
        counts = pl.DataFrame({"n_seeds": [self.n_seeds(m) for m in models],
                               "n_prompts": [self.n_prompts(m) for m in models],
                               "train_images": [self.budget(m)[0] for m in models],
                               "train_cpu_s": [self.budget(m)[1] for m in models]},
                              schema={"n_seeds": pl.Int64, "n_prompts": pl.Int64, "train_images": pl.Int64,
                                      "train_cpu_s": pl.Float64})
        return pl.concat([self._frame(models, [(c, c, None) for c in columns], against), counts], how="horizontal")

    def metric_table(self, benchmark: str, rows: list[str] | None = None) -> pl.DataFrame:
        """Every metric of one benchmark (the MAR table: the quality benchmark), the models that have it."""
        metrics = sorted(self.means.filter(pl.col("benchmark") == benchmark)["metric"].unique().to_list())
        models = [m for m in self.select(rows) if any(self.mean(m, benchmark, k) is not None for k in metrics)]
        return self._frame(models, [(k, benchmark, k) for k in metrics])

    def exploit_table(self, rows: list[str] | None = None, metric: str = EXPLOIT_METRIC) -> pl.DataFrame:
        """The share of prompt-ignoring samples per model and benchmark, where the evaluation recorded it."""
        have = set(self.means.filter(pl.col("metric") == metric)["benchmark"].to_list())
        benchmarks = [t for t in self.tasks if t in have] + sorted(have - set(self.tasks))
        models = [m for m in self.select(rows) if any(self.mean(m, b, metric) is not None for b in benchmarks)]
        return self._frame(models, [(b, b, metric) for b in benchmarks])


def spec_labels(pattern: str) -> list[str]:
    """The labels of the spec files a glob matches, in path order."""
    from flowopd.spec import load_spec

    paths = sorted(glob.glob(pattern))
    if not paths:
        raise LedgerError(f"no spec file matches {pattern}")
    return [load_spec(p).label for p in paths]


def results_of(con, run_ids: list[str]) -> Results:
    """Results of eval runs of one evaluation setting, one run per label (a group of row_groups)."""
    values = query_runs(con, HEADLINE_SQL, run_ids)
    means = query_runs(con, MEANS_SQL, run_ids)
    model_of = values.select("run_id", "model").unique()
    budgets = (row_budgets(con, run_ids).join(model_of, on="run_id").group_by("model", maintain_order=True)
               .agg(pl.col("train_images").mean().round().cast(pl.Int64), pl.col("train_cpu_s").mean().round(1))
               .select("model", "train_images", "train_cpu_s"))
    has_samples = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'samples'")
    samples = query_runs(con, SAMPLES_SQL, run_ids) if has_samples.fetchall()[0][0] else None
    if samples is None or not samples.height:
        return Results(values, means, {}, budgets=budgets)
    prompts = samples.group_by("model", "benchmark").agg(prompts=pl.col("prompt").n_unique(),
                                                         rows=pl.col("prompt_index").n_unique(),
                                                         seeds=pl.col("seed").n_unique())
    return Results(values, means, sample_estimates(samples, means), prompts, budgets, samples)


def load_groups(con, run_ids: list[str]) -> list[Results]:
    """Results per evaluation setting of the given eval runs, the main setting first (row_groups)."""
    return [results_of(con, group) for group in row_groups(con, run_ids)] or [results_of(con, [])]


def load_runs(con, run_ids: list[str]) -> Results:
    """Results of the main evaluation setting's rows among the given eval runs: what the main table and claims use."""
    return load_groups(con, run_ids)[0]


def current_run_ids(con, shards: list | None = None, db: str | Path = DEFAULT_DB, spec_hash: str | None = None):
    """The eval runs of `shards` (each must be in the ledger), else the latest test eval run of every row (row_groups
    leaves val runs out either way)."""
    if not shards:
        return [r[0] for r in con.execute(_fill(con, LATEST_SQL), [spec_hash, spec_hash]).fetchall()]
    run_of = {shard_run_id(s): Path(s) for s in shards}
    known = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE phase = 'eval'").fetchall()}
    missing = [f"{path} (run {run_id})" for run_id, path in run_of.items() if run_id not in known]
    if missing:
        raise LedgerError(f"not in the ledger {db}, ingest first: " + ", ".join(missing))
    return list(run_of)


def load(db: str | Path = DEFAULT_DB, shards: list | None = None) -> Results:
    """The current results: the runs of `shards` (eval shard folders), else the latest run of every label."""
    with connect(db, read_only=True) as con:
        return load_runs(con, current_run_ids(con, shards, db))


def main_table(db: str | Path = DEFAULT_DB, shards: list | None = None, **options) -> pl.DataFrame:
    """The main table (options: rows, columns, against; see Results.main_table)."""
    return load(db, shards).main_table(**options)


def mar_table(db: str | Path = DEFAULT_DB, shards: list | None = None, benchmark: str = "quality",
              rows: list[str] | None = None) -> pl.DataFrame:
    return load(db, shards).metric_table(benchmark, rows)


def exploit_table(db: str | Path = DEFAULT_DB, shards: list | None = None, rows: list[str] | None = None):
    return load(db, shards).exploit_table(rows)

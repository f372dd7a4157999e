"""The validation table (`reports/validation.csv` / `.md`): the evaluations of the validation prompts
(`evaluation.split: val`, the sweeps in specs/sweeps/), where the values the specs use are chosen.

One row per (label, evaluation setting, task): the task's headline metric, the mean over a row's training seeds of
each model's mean over prompt rows and evaluation seeds, with the main table's 95% bootstrap interval (training
seeds, then distinct prompts with their evaluation seeds nested; `flowopd.results.bootstrap`), and `avg`, the mean
over tasks of headline / normaliser, as the main table's. What a sweep varies is in its label (`sweep:mar=0.1`);
`evaluation` is the eval sub-spec's hash (10 characters, as the main table's provenance names it). The test split
never enters this table, and the validation split never enters the others (flowopd.results.tables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from flowopd.results import bootstrap
from flowopd.results.tables import results_of, row_groups

if TYPE_CHECKING:
    from flowopd.results.tables import Results

TITLE = "Validation sweeps (the values the specs use were chosen here)"
AVG_METRIC = "headline/normaliser"  # avg's metric: the mean over tasks of headline / normaliser
SCHEMA = {"label": pl.String, "evaluation": pl.String, "task": pl.String, "metric": pl.String,
          "estimate": pl.Float64, "lo": pl.Float64, "hi": pl.Float64, "n_seeds": pl.Int64, "n_prompts": pl.Int64}


def load_validation(con, run_ids: list[str]) -> list[Results]:
    """Results per evaluation setting of the val runs among `run_ids` (none: an empty list)."""
    return [results_of(con, group) for group in row_groups(con, run_ids, "val")]


def validation_frame(groups: list[Results]) -> pl.DataFrame:
    """The table's rows (SCHEMA): per setting, label (report order) and task (then avg) with a result."""
    rows = []
    for results in groups:
        evaluation = next(iter(results.values["evaluation"].drop_nulls()), "?")[:10]
        for label in results.models:  # report order (tables.model_order)
            for task in [*results.tasks, "avg"]:
                mean = results.mean(label, task)
                if mean is None:  # not evaluated on this task (or avg: on some task)
                    continue
                estimate = results.estimate(label, task)
                lo, hi = bootstrap.interval(estimate.draws) if estimate is not None else (None, None)
                rows.append({"label": label, "evaluation": evaluation, "task": task,
                             "metric": AVG_METRIC if task == "avg" else results.headline[task],
                             "estimate": mean, "lo": lo, "hi": hi, "n_seeds": results.n_seeds(label),
                             "n_prompts": results.n_prompts(label, task)})
    return pl.DataFrame(rows, schema=SCHEMA)


def _shown(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def validation_markdown(frame: pl.DataFrame, digits: int, intervals: str) -> str:
    """The table as Markdown (estimate [lo, hi]) under a `# TITLE` heading, with what the numbers are."""
    lines = [f"# {TITLE}", "",
             ("Evaluations of the validation prompts (`evaluation.split: val`: the sweeps in `specs/sweeps/`), "
              "where the values the specs use are chosen; the test prompts never enter this table, and these runs "
              "enter no other table or claim. One row per label, evaluation setting (the eval sub-spec's hash) and "
              "task: the task's headline metric, the mean over the row's training seeds of each model's mean over "
              f"prompt rows and evaluation seeds; `avg` = mean over tasks of headline / normaliser. {intervals}. "
              "[validation.csv](validation.csv) holds the numbers."), "",
             "| label | evaluation | task | metric | estimate [lo, hi] | n_seeds | n_prompts |",
             "|---|---|---|---|---|---|---|"]
    for row in frame.iter_rows(named=True):
        cell = _shown(row["estimate"], digits)
        if row["lo"] is not None:
            cell += f" [{_shown(row['lo'], digits)}, {_shown(row['hi'], digits)}]"
        lines.append(f"| {row['label']} | `{row['evaluation']}` | {row['task']} | {row['metric']} | {cell} | "
                     f"{_shown(row['n_seeds'], digits)} | {_shown(row['n_prompts'], digits)} |")
    return "\n".join(lines) + "\n"

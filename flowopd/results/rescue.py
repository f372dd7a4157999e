"""Rescue where every teacher fails: does the student succeed on samples that defeat all teachers, more often than a
retrained teacher does? (the claim `rescue_all_teachers_fail` of `flowopd.results.claims`, `reports/rescue.csv`).

Per task (its benchmark, scored by its headline metric on the normalised scale, headline / normaliser) and training
seed s:
- the failure set F_s: the samples (prompt row, evaluation seed) on which every teacher of seed s (`teacher:<task>`
  for each task of the results: the three teacher rows) scores below FAIL. An evaluation samples every model with
  the same noise per (prompt, evaluation seed), so a sample is the same draw for every model;
- a model rescues a sample when it scores at least FAIL there and the evaluation's prompt-ignoring detector
  (`prompt_ignoring`, flowopd/evaluation/exploits.py) does not flag it: a high score on an image that ignores its
  prompt is no rescue;
- the student is `flow_opd` of seed s; the control is the task's own teacher of the next training seed (the seeds in
  order, the last followed by the first: (s + 1) mod S for seeds 0..S-1), a model trained for the task that took no
  part in choosing F_s: what retraining alone rescues by chance.
The rates pool over seeds: rescued samples / |F|, |F| = the sum over seeds of |F_s|. `rescue.csv` also gives the
rate of the students of the other training seeds on each F_s (pooled over (sample, seed) pairs; no interval): a
student not distilled from the teachers that failed, which tells inherited failures from regression to the mean. The claim's d = student rate -
control rate, its interval from `bootstrap.share_draws` (training seeds, then F's distinct prompts, each with all
its samples; both rates from one resample: paired). Unresolved, with a reason: a row missing, no per-sample scores
or flags, F empty, or one training seed (no teacher of another seed to compare with).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from flowopd.results.bootstrap import share_draws
from flowopd.results.tables import EXPLOIT_METRIC, Results

STUDENT = "flow_opd"
FAIL = 0.5  # normalised headline: below it a sample fails, at or above it (unflagged) it is a success
SAMPLE = ["prompt_index", "seed"]  # one sample of a benchmark: prompt row x evaluation seed
CSV_COLUMNS = ["task", "failures", "student_rate", "control_rate", "student_other_seeds_rate", "n_seeds", "n_prompts"]


@dataclass
class Rescue:
    """One task's rescue rates; `draws` of student rate - control rate, None where unresolved (`reason`)."""

    task: str
    failures: int | None = None  # |F|, summed over training seeds
    n_seeds: int | None = None
    n_prompts: int | None = None  # distinct prompt texts among F
    student_rate: float | None = None
    control_rate: float | None = None
    student_other_seeds_rate: float | None = None  # the students of the other training seeds on F_s (inheritance)
    draws: np.ndarray | None = None
    reason: str | None = None

    @property
    def estimate(self) -> float | None:
        return None if self.control_rate is None else self.student_rate - self.control_rate


def scored(samples: pl.DataFrame, task: str, headline: str, normaliser: float) -> pl.DataFrame:
    """One benchmark's samples: model, training_seed, prompt_index, seed, prompt, score (normalised), flag (null
    where the evaluation recorded no `prompt_ignoring`)."""
    on = samples.filter(pl.col("benchmark") == task)
    score = on.filter(pl.col("metric") == headline).select(
        "model", "training_seed", *SAMPLE, "prompt", score=pl.col("value") / normaliser)
    flag = on.filter(pl.col("metric") == EXPLOIT_METRIC).select("model", "training_seed", *SAMPLE, flag="value")
    return score.join(flag, on=["model", "training_seed", *SAMPLE], how="left")


def failure_set(table: pl.DataFrame, teachers: list[str], seed: int) -> pl.DataFrame:
    """F_s: prompt_index, seed, prompt of the samples every teacher of training seed `seed` scores below FAIL."""
    mine = table.filter(pl.col("model").is_in(teachers) & (pl.col("training_seed") == seed))
    per_sample = mine.group_by(SAMPLE).agg(pl.col("prompt").first(), pl.len().alias("teachers"),
                                           pl.col("score").max().alias("best"))
    return (per_sample.filter((pl.col("teachers") == len(teachers)) & (pl.col("best") < FAIL))
            .select(*SAMPLE, "prompt").sort(SAMPLE))


def rescued(table: pl.DataFrame, failed: pl.DataFrame, model: str, seed: int, task: str) -> tuple[pl.Series, str]:
    """1 / 0 per sample of `failed`: did `model` of training seed `seed` rescue it; or a reason it cannot say."""
    theirs = table.filter((pl.col("model") == model) & (pl.col("training_seed") == seed)).select(*SAMPLE, "score",
                                                                                                   "flag")
    joined = failed.join(theirs, on=SAMPLE, how="left")
    if joined["score"].null_count():
        return pl.Series(), f"{model} (training seed {seed}) has no {task} score for part of F"
    if joined["flag"].null_count():
        return pl.Series(), f"no `{EXPLOIT_METRIC}` flags for {model} (training seed {seed}) on {task}"
    return ((joined["score"] >= FAIL) & (joined["flag"] == 0)).cast(pl.Float64), ""


def rescue(results: Results, task: str, student: str = STUDENT) -> Rescue:
    """The rescue rates of one task (module docstring)."""
    teachers = [f"teacher:{t}" for t in results.tasks]
    missing = [m for m in dict.fromkeys((student, f"teacher:{task}", *teachers)) if m not in results.models]
    if missing:
        return Rescue(task, reason=f"row{'s' * (len(missing) > 1)} {' and '.join(missing)} missing")
    if task not in results.tasks:
        return Rescue(task, reason=f"no {task} benchmark")
    if results.samples is None:
        return Rescue(task, reason="no per-sample scores")
    table = scored(results.samples, task, results.headline[task], results.normaliser[task])
    seeds_of = [set(table.filter(pl.col("model") == m)["training_seed"]) for m in (student, *teachers)]
    seeds = sorted(set.intersection(*seeds_of))
    if not seeds:
        return Rescue(task, reason=f"no training seed with {task} samples of {student} and every teacher")
    parts, others = [], []
    for i, seed in enumerate(seeds):
        failed = failure_set(table, teachers, seed)
        roles = [("student", student, seed)]
        if len(seeds) > 1:  # with one seed the control would be a teacher that failed all of F by construction
            roles.append(("control", f"teacher:{task}", seeds[(i + 1) % len(seeds)]))
        columns = {"training_seed": pl.lit(seed)}
        for role, model, of_seed in roles:
            hits, why = rescued(table, failed, model, of_seed, task)
            if why:
                return Rescue(task, reason=why)
            columns[role] = hits
        parts.append(failed.with_columns(**columns))
        for other in (s for s in seeds if s != seed):  # students not distilled from the teachers that failed
            hits, why = rescued(table, failed, student, other, task)
            if why:
                return Rescue(task, reason=why)
            others.append(hits)
    failures = pl.concat(parts, how="diagonal")
    common = {"failures": failures.height, "n_seeds": len(seeds), "n_prompts": failures["prompt"].n_unique()}
    if not failures.height:
        return Rescue(task, **common, reason=f"no {task} sample that every teacher fails")
    student_rate = failures["student"].mean()
    if len(seeds) == 1:
        return Rescue(task, **common, student_rate=student_rate,
                      reason="one training seed: no teacher of another seed to compare with")
    prompts = sorted(failures["prompt"].unique().to_list())
    row_of, column_of = {s: i for i, s in enumerate(seeds)}, {p: j for j, p in enumerate(prompts)}
    cells = failures.group_by("training_seed", "prompt").agg(pl.col("student", "control").sum(), pl.len())
    hits, totals = np.zeros((2, len(seeds), len(prompts))), np.zeros((len(seeds), len(prompts)))
    for seed, prompt, by_student, by_control, n in cells.iter_rows():  # a seed with F_s empty keeps its zeros
        i, j = row_of[seed], column_of[prompt]
        hits[:, i, j], totals[i, j] = (by_student, by_control), n
    shares = share_draws(f"rescue {task}", tuple(seeds), tuple(prompts), hits, totals)
    return Rescue(task, **common, student_rate=student_rate, control_rate=failures["control"].mean(),
                  student_other_seeds_rate=pl.concat(others).mean(), draws=shares[:, 0] - shares[:, 1])


def rescue_frame(results: Results, student: str = STUDENT) -> pl.DataFrame:
    """What `reports/rescue.csv` holds: per task |F| (summed over training seeds), the student's and the control's
    rescue rates, and the training seeds and distinct prompts of F."""
    found = [rescue(results, task, student) for task in results.tasks]
    return pl.DataFrame([{c: getattr(r, c) for c in CSV_COLUMNS} for r in found],
                        schema={"task": pl.String, "failures": pl.Int64, "student_rate": pl.Float64,
                                "control_rate": pl.Float64, "student_other_seeds_rate": pl.Float64,
                                "n_seeds": pl.Int64, "n_prompts": pl.Int64})

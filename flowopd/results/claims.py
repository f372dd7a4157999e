"""The paper's claims as data: one row per comparison (`reports/claims.csv`, rendered into `reports/README.md`).

Each comparison is a difference of means d = a - b on the normalised scale (headline / normaliser; avg is already
normalised), with its bootstrap interval [lo, hi] (`flowopd.results.bootstrap`: training seeds, then distinct
prompts; paired where both rows share prompts and seeds), decided against a margin:
- `student_matches_teachers`, one row per teacher on its task, d = student - teacher: an equivalence test (two
  one-sided tests at the margin): holds when the whole interval lies inside (-margin, +margin); fails when it lies
  wholly outside, below -margin or above +margin (a student surely better than its teacher by more than the margin
  fails "matches": that is the separate claim that it exceeds them); else unresolved.
- `student_above_mixed` (avg, flow_opd - mixed_grpo), `mar_quality` (quality, flow_opd - flow_opd:no_mar),
  `cold_start_merge_vs_sft` and `cold_start_merge_vs_none` (avg, flow_opd - the ablation): superiority by at least
  the smallest effect worth reporting: holds when lo > margin; fails when hi < margin (the data exclude an effect of
  that size); else unresolved.
- `seesaw_offtask`, one row per teacher and each of the other tasks, d = teacher - base on that task, and
  `mixed_interference`, one row per task, d = the budget-matched mix (`mixed_grpo:matched`) - that task's teacher:
  a drop by at least the margin (a single reward degrades the other tasks; mixing rewards costs a task what its own
  teacher reaches): holds when hi < -margin; fails when lo > -margin (the data exclude a drop that large); else
  unresolved.
- `student_exceeds_teachers`, one row per teacher on its task, d = student - teacher (the comparisons of
  `student_matches_teachers`, decided by the superiority rule): holds when lo > margin; fails when hi < margin.
- `rescue_all_teachers_fail`, one row per task (`flowopd.results.rescue`): on the samples where every teacher of a
  training seed scores below 0.5 (normalised), d = the student's rescue rate (score >= 0.5, not flagged
  `prompt_ignoring`) - that of the task's teacher of the next training seed; superiority: holds when lo > margin,
  fails when hi < margin; unresolved, with the reason, when no sample fails every teacher or there is one training
  seed. `reports/rescue.csv` holds the failure counts and both rates.
The last four claims use the superiority claims' margin, EFFECT_MARGIN.
- `reference_update`, d = the reference code's update (`flow_opd:reference_update`, estimator `reference_kl`) -
  `flow_opd` on avg: an equivalence test at the teachers' margin (0.03), as `student_matches_teachers`.
A row the comparison needs that is missing, or has no per-sample scores, makes it unresolved (the README names why);
so does an interval over fewer than MIN_PROMPTS distinct test prompts (its interval is still shown).

Correction: Bonferroni over all m comparison rows of the file: each interval is the (1 - 0.05/m) percentile
interval, so that all m hold together with probability at least 95% (Bonferroni, m = the number of rows, missing
ones included). `n_seeds` and `n_prompts` of a row: the smaller of the two models' training seeds and distinct
test prompts (for avg, the smallest over the tasks; for the rescue, the training seeds it uses and the distinct
prompts of the failure set): how much data the interval rests on.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from flowopd.results.bootstrap import interval
from flowopd.results.ledger import DEFAULT_DB
from flowopd.results.rescue import FAIL, rescue
from flowopd.results.tables import Results, load

STUDENT, MIXED, NO_MAR, SFT_INIT, NO_COLD_START = (
    "flow_opd", "mixed_grpo", "flow_opd:no_mar", "flow_opd:sft_init", "flow_opd:no_cold_start")
BASE, MATCHED, RESCUE = "base", "mixed_grpo:matched", "rescue_all_teachers_fail"
REFERENCE = "flow_opd:reference_update"  # the authors' published update (specs/ablations/reference_update.yaml)
EQUIVALENCE_CLAIMS = ("student_matches_teachers", "reference_update")
ALPHA = 0.05  # family-wise error rate of the whole file
TEACHER_MARGIN = 0.03  # "matches": this far below its teacher (normalised), the tolerance the claims always used
EFFECT_MARGIN = 0.01  # smallest effect worth reporting: one point on the 0-1 normalised scale, the paper's 2 decimals
# A verdict needs at least this many distinct test prompts behind the interval (for avg: in every task): a percentile
# bootstrap over a handful of prompt clusters draws only a few distinct resamples and understates the spread.
MIN_PROMPTS = 20
CLAIMS = {  # claim id -> (what it says, the margin rule)
    "student_matches_teachers": (
        f"the student (`{STUDENT}`) matches every teacher on that teacher's task (equivalence)",
        "−margin < lo and hi < margin"),
    "student_above_mixed": (f"the student's avg is above `{MIXED}`'s", "lo > margin"),
    "mar_quality": (f"MAR: `{STUDENT}` is above `{NO_MAR}` on quality", "lo > margin"),
    "cold_start_merge_vs_sft": (f"cold start: merge (`{STUDENT}`) is above SFT (`{SFT_INIT}`) on avg", "lo > margin"),
    "cold_start_merge_vs_none": (f"cold start: merge (`{STUDENT}`) is above none (`{NO_COLD_START}`) on avg",
                                 "lo > margin"),
    "seesaw_offtask": (
        f"a single-reward teacher degrades the other tasks: each teacher is below `{BASE}` on each other task",
        "hi < −margin"),
    "mixed_interference": (
        f"mixing rewards interferes: the budget-matched mix (`{MATCHED}`) is below each teacher on that teacher's task",
        "hi < −margin"),
    "student_exceeds_teachers": (f"the student (`{STUDENT}`) is above every teacher on that teacher's task",
                                 "lo > margin"),
    RESCUE: (
        (f"where every teacher of a training seed fails a sample (normalised headline < {FAIL:g}), the student of "
         f"that seed rescues it (≥ {FAIL:g}, not flagged `prompt_ignoring`) more often than the task's teacher of the "
         "next training seed (difference of rescue rates; `rescue.csv`)"),
        "lo > margin"),
    "reference_update": (
        f"the reference code's update (`{REFERENCE}`) is within the margin of `{STUDENT}` on avg (equivalence)",
        "−margin < lo and hi < margin"),
}
CSV_COLUMNS = ["claim", "metric", "estimate", "lo", "hi", "margin", "verdict", "n_seeds", "n_prompts"]
SCHEMA = {"claim": pl.String, "metric": pl.String, "estimate": pl.Float64, "lo": pl.Float64, "hi": pl.Float64,
          "margin": pl.Float64, "verdict": pl.String, "n_seeds": pl.Int64, "n_prompts": pl.Int64,
          "a": pl.String, "b": pl.String, "pairing": pl.String, "level": pl.Float64, "reason": pl.String}


def bonferroni_level(m: int) -> float:
    """The level of each of m intervals whose family holds at 1 - ALPHA."""
    return 1 - ALPHA / max(m, 1)


def verdict(lo: float, hi: float, threshold: float) -> str:
    """The claim d > threshold: holds if the whole interval lies above, fails if it lies below, else unresolved."""
    return "holds" if lo > threshold else "fails" if hi < threshold else "unresolved"


def equivalence(lo: float, hi: float, margin: float) -> str:
    """|d| < margin: holds if the whole interval lies inside (-margin, margin), fails if it lies wholly outside."""
    return "holds" if -margin < lo and hi < margin else "fails" if hi < -margin or lo > margin else "unresolved"


def below(lo: float, hi: float, margin: float) -> str:
    """d < -margin (a drop of at least the margin): holds if the whole interval lies below -margin, fails if it lies
    above."""
    return "holds" if hi < -margin else "fails" if lo > -margin else "unresolved"


def decide(claim: str, lo: float, hi: float, margin: float) -> str:
    """A comparison's verdict: equivalence for "matches", a drop for the seesaw and the interference, superiority by
    the margin for the rest."""
    if claim in EQUIVALENCE_CLAIMS:
        return equivalence(lo, hi, margin)
    return below(lo, hi, margin) if claim in ("seesaw_offtask", "mixed_interference") else verdict(lo, hi, margin)


def _smaller(*counts):
    return None if None in counts else min(counts)


def _row(claim: str, a: str, b: str, metric: str, margin: float) -> dict:
    """A comparison row with nothing decided yet."""
    return {"claim": claim, "metric": metric, "estimate": None, "lo": None, "hi": None, "margin": margin,
            "verdict": "unresolved", "n_seeds": None, "n_prompts": None, "a": a, "b": b, "pairing": None,
            "level": None, "reason": None}


def comparison(results: Results, claim: str, a: str, b: str, metric: str, margin: float) -> tuple[dict, object]:
    """One comparison row (lo, hi and verdict still open) and the bootstrap draws of (a - b), normalised."""
    row = _row(claim, a, b, metric, margin)
    missing = [m for m in (a, b) if m not in results.models]
    if missing or metric not in (*results.tasks, "avg"):
        why = f"row{'s' * (len(missing) > 1)} {' and '.join(missing)} missing" if missing else f"no {metric} benchmark"
        return row | {"reason": why}, None
    row |= {"n_seeds": _smaller(results.n_seeds(a), results.n_seeds(b)),
            "n_prompts": _smaller(results.n_prompts(a, metric), results.n_prompts(b, metric))}
    scale = 1.0 if metric == "avg" else 1 / results.normaliser.get(metric, 1.0)
    mean_a, mean_b = results.mean(a, metric), results.mean(b, metric)
    if mean_a is None or mean_b is None:
        return row | {"reason": f"no {metric} result for {a if mean_a is None else b}"}, None
    row["estimate"] = (mean_a - mean_b) * scale
    ea, eb = results.estimate(a, metric), results.estimate(b, metric)
    if ea is None or eb is None:
        return row | {"reason": f"no per-sample scores for {a if ea is None else b}"}, None
    return row | {"pairing": ea.pairing(eb)}, (ea - eb).draws * scale


def rescue_comparison(results: Results, task: str) -> tuple[dict, object]:
    """The rescue row of one task (flowopd.results.rescue): student rate - control rate on F, and its draws."""
    found = rescue(results, task, STUDENT)
    row = _row(RESCUE, STUDENT, f"teacher:{task}", task, EFFECT_MARGIN)
    row |= {"estimate": found.estimate, "n_seeds": found.n_seeds, "n_prompts": found.n_prompts,
            "reason": found.reason, "pairing": None if found.draws is None else "paired"}
    return row, found.draws


def claims_frame(results: Results, quality: str = "quality") -> pl.DataFrame:
    """One row per comparison: the CSV_COLUMNS, then a, b, pairing, level (Bonferroni) and the reason of an
    unresolved row that lacks data."""
    teachers = [m.removeprefix("teacher:") for m in results.models if m.startswith("teacher:")]
    tasks = results.tasks + sorted(set(teachers) - set(results.tasks))  # a task without its teacher: named missing
    planned = [("student_matches_teachers", STUDENT, f"teacher:{t}", t, TEACHER_MARGIN) for t in tasks]
    if not tasks:
        planned.append(("student_matches_teachers", STUDENT, "teacher:<task>", "avg", TEACHER_MARGIN))
    planned += [("student_above_mixed", STUDENT, MIXED, "avg", EFFECT_MARGIN),
                ("mar_quality", STUDENT, NO_MAR, quality, EFFECT_MARGIN),
                ("cold_start_merge_vs_sft", STUDENT, SFT_INIT, "avg", EFFECT_MARGIN),
                ("cold_start_merge_vs_none", STUDENT, NO_COLD_START, "avg", EFFECT_MARGIN)]
    planned += [("seesaw_offtask", f"teacher:{t}", BASE, other, EFFECT_MARGIN)
                for t in tasks for other in results.tasks if other != t]
    planned += [("mixed_interference", MATCHED, f"teacher:{t}", t, EFFECT_MARGIN) for t in tasks]
    planned += [("student_exceeds_teachers", STUDENT, f"teacher:{t}", t, EFFECT_MARGIN) for t in tasks]
    compared = [comparison(results, *plan) for plan in planned]
    compared += [rescue_comparison(results, t) for t in tasks]
    compared.append(comparison(results, "reference_update", REFERENCE, STUDENT, "avg", TEACHER_MARGIN))
    level = bonferroni_level(len(compared))
    rows = []
    for row, draws in compared:
        if draws is not None:
            lo, hi = interval(draws, level)
            row |= {"lo": lo, "hi": hi, "level": level, "verdict": decide(row["claim"], lo, hi, row["margin"])}
            if row["n_prompts"] is not None and row["n_prompts"] < MIN_PROMPTS:
                row |= {"verdict": "unresolved",
                        "reason": f"{row['n_prompts']} distinct test prompts, fewer than the {MIN_PROMPTS} a verdict "
                                  f"needs"}
        rows.append(row)
    return pl.DataFrame(rows, schema=SCHEMA)


def csv_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """What `reports/claims.csv` holds: exactly CSV_COLUMNS."""
    return frame.select(CSV_COLUMNS)


def overall(verdicts: list[str]) -> str:
    """A claim of several comparisons: holds when all hold, fails when any fails, else unresolved."""
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "fails" if "fails" in verdicts else "unresolved"


def _number(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def claim_lines(frame: pl.DataFrame, digits: int = 3) -> list[str]:
    """Markdown lines: the correction (Bonferroni, m), then one per claim: its overall verdict, then each comparison
    with its estimate, interval, pairing, data and rule, and why it is unresolved where a row lacks data."""
    m = frame.height
    lines = [(f"Bonferroni, m = {m}: each interval is the {100 * bonferroni_level(m):.2f}% percentile interval "
             f"(family-wise {100 * (1 - ALPHA):.0f}%).")]
    for claim, (statement, rule) in CLAIMS.items():
        parts = frame.filter(pl.col("claim") == claim).to_dicts()
        described = [] if parts else ["no comparison: no task it applies to"]
        for p in parts:
            text = f"`{p['a']}` − `{p['b']}` {'rescue rate ' if claim == RESCUE else ''}on {p['metric']}"
            if p["estimate"] is not None:
                text += f" = {_number(p['estimate'], digits)}"
            if p["lo"] is not None:
                text += (f" [{_number(p['lo'], digits)}, {_number(p['hi'], digits)}] ({p['pairing']}; "
                         f"{p['n_seeds']} training seed{'s' * (p['n_seeds'] != 1)}, {p['n_prompts']} distinct prompts)")
            reason = f" ({p['reason']})" if p["reason"] else ""
            described.append(f"{text}: {p['verdict']}{reason}")
        margin = parts[0]["margin"] if parts else None
        head = f"- `{claim}`: {statement}; {rule}" + (f", margin {margin:g}" if margin is not None else "")
        lines.append(f"{head}: **{overall([p['verdict'] for p in parts])}**. " + "; ".join(described) + ".")
    return lines


def claims(db: str | Path = DEFAULT_DB, shards: list | None = None, quality: str = "quality") -> pl.DataFrame:
    """The claims frame of the current results: the runs of `shards`, else the latest run of every label."""
    return claims_frame(load(db, shards), quality)

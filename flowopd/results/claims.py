"""The paper's claims, decided from the ledger with bootstrap intervals (the report lists them in README.md).

Each claim is a difference of means d = a - b (bootstrap over prompts x seeds, paired where both rows share prompts
and seeds; 95% percentile interval [lo, hi]) against a threshold t on the side the paper claims, d > t:
- holds:      lo > t, the whole interval lies on the claimed side;
- fails:      hi < t, the whole interval lies on the other side;
- unresolved: the interval contains t, or a row the claim needs is missing (named), or has no per-sample scores.
A claim made of several comparisons (one per teacher; merge against SFT and against none) holds when every part
holds, fails when any part fails, and is unresolved otherwise. Each interval is 95% on its own (no correction for
the several comparisons).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from flowopd.results.bootstrap import interval
from flowopd.results.ledger import DEFAULT_DB
from flowopd.results.tables import Results, load

STUDENT, MIXED, NO_MAR, SFT_INIT, NO_COLD_START = (
    "flow_opd", "mixed_grpo", "flow_opd:no_mar", "flow_opd:sft_init", "flow_opd:no_cold_start")
TEACHER_MARGIN = 0.03  # on the normalised scale (headline / normaliser)
CLAIMS = {
    "a": f"The student (`{STUDENT}`) is within {TEACHER_MARGIN} of every teacher on that teacher's task, or above "
         "it (headline / normaliser)",
    "b": f"The student's avg is above `{MIXED}`'s",
    "c": f"MAR: `{NO_MAR}` is below `{STUDENT}` on the quality benchmark",
    "d": f"Cold start: merge (`{STUDENT}`) is above SFT (`{SFT_INIT}`) and above none (`{NO_COLD_START}`) on avg",
}
SCHEMA = {"claim": pl.String, "a": pl.String, "b": pl.String, "column": pl.String, "delta": pl.Float64,
          "lo": pl.Float64, "hi": pl.Float64, "threshold": pl.Float64, "pairing": pl.String, "verdict": pl.String}


def verdict(lo: float, hi: float, threshold: float) -> str:
    return "holds" if lo > threshold else "fails" if hi < threshold else "unresolved"


def check(results: Results, claim: str, a: str, b: str, column: str, threshold: float, scale: float = 1.0) -> dict:
    """One comparison: (a - b) * scale on `column` against `threshold`."""
    row = {"claim": claim, "a": a, "b": b, "column": column, "delta": None, "lo": None, "hi": None,
           "threshold": threshold, "pairing": None}
    missing = [m for m in (a, b) if m not in results.models]
    if missing or column not in (*results.tasks, "avg"):
        why = (f"row{'s' * (len(missing) > 1)} {' and '.join(missing)} missing" if missing
               else f"no {column} benchmark")
        return row | {"verdict": f"unresolved ({why})"}
    mean_a, mean_b = results.mean(a, column), results.mean(b, column)
    if mean_a is None or mean_b is None:
        return row | {"verdict": f"unresolved (no {column} result for {a if mean_a is None else b})"}
    row["delta"] = (mean_a - mean_b) * scale
    ea, eb = results.estimate(a, column), results.estimate(b, column)
    if ea is None or eb is None:
        return row | {"verdict": f"unresolved (no per-sample scores for {a if ea is None else b})"}
    lo, hi = interval((ea - eb).draws * scale)
    return row | {"lo": lo, "hi": hi, "pairing": ea.pairing(eb), "verdict": verdict(lo, hi, threshold)}


def claims_frame(results: Results, quality: str = "quality") -> pl.DataFrame:
    """One row per comparison of every claim (claim, a, b, column, delta, lo, hi, threshold, pairing, verdict)."""
    rows = []
    teachers = [m for m in results.models if m.startswith("teacher:")]
    for teacher in teachers:
        task = teacher.removeprefix("teacher:")
        rows.append(check(results, "a", STUDENT, teacher, task, -TEACHER_MARGIN,
                          1 / results.normaliser.get(task, 1.0)))
    if not teachers:
        rows.append(check(results, "a", STUDENT, "teacher:<task>", "avg", -TEACHER_MARGIN))
    rows.append(check(results, "b", STUDENT, MIXED, "avg", 0.0))
    rows.append(check(results, "c", STUDENT, NO_MAR, quality, 0.0))
    rows.append(check(results, "d", STUDENT, SFT_INIT, "avg", 0.0))
    rows.append(check(results, "d", STUDENT, NO_COLD_START, "avg", 0.0))
    return pl.DataFrame(rows, schema=SCHEMA)


def overall(verdicts: list[str]) -> str:
    if len(verdicts) == 1:
        return verdicts[0]
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "fails" if "fails" in verdicts else "unresolved"


def _number(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def claim_lines(frame: pl.DataFrame, digits: int = 3) -> list[str]:
    """Markdown lines, one per claim: its overall verdict, then each comparison with its interval."""
    lines = []
    for claim, statement in CLAIMS.items():
        parts = frame.filter(pl.col("claim") == claim).to_dicts()
        described = []
        for p in parts:
            text = f"`{p['a']}` − `{p['b']}` on {p['column']}"
            if p["delta"] is not None:
                text += f" = {_number(p['delta'], digits)}"
            if p["lo"] is not None:
                text += f" [{_number(p['lo'], digits)}, {_number(p['hi'], digits)}] ({p['pairing']})"
            described.append(f"{text}, claimed > {_number(p['threshold'], digits)}: {p['verdict']}")
        verdict_all = overall([p["verdict"] for p in parts])
        lines.append(f"- ({claim}) {statement}: **{verdict_all}**. " + "; ".join(described) + ".")
    return lines


def claims(db: str | Path = DEFAULT_DB, shards: list | None = None, quality: str = "quality") -> pl.DataFrame:
    """The claims frame of the current results: the runs of `shards`, else the latest run of every label."""
    return claims_frame(load(db, shards), quality)

"""Two specs side by side: the fields they differ in, then B - A per model and metric with its bootstrap interval
(paired where both rows were evaluated on the same prompts and seeds) and whether that interval excludes 0."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from flowopd.results.bootstrap import interval
from flowopd.results.formats import format_rows
from flowopd.results.ledger import DEFAULT_DB, LedgerError, connect
from flowopd.results.tables import Results, current_run_ids, load_runs, model_order

SCHEMA = {"model_a": pl.String, "model_b": pl.String, "column": pl.String, "a": pl.Float64, "b": pl.Float64,
          "delta": pl.Float64, "lo": pl.Float64, "hi": pl.Float64, "pairing": pl.String, "excludes_zero": pl.Boolean}


def flatten(data, prefix: str = "") -> dict:
    """Dotted paths to leaves; mappings and lists of mappings are descended, lists of scalars are leaves."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat if flat else {prefix: data}


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING = _Missing()


def spec_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(path, old, new) for every leaf that differs; a leaf absent on one side is `MISSING` there."""
    fa, fb = flatten(a), flatten(b)
    paths = list(fa) + [p for p in fb if p not in fa]
    return [(p, fa.get(p, MISSING), fb.get(p, MISSING)) for p in paths if fa.get(p, MISSING) != fb.get(p, MISSING)]


def model_pairs(a: list[str], b: list[str], label_a: str, label_b: str) -> list[tuple[str | None, str | None]]:
    """Models paired by label; each spec's own model (its label) is paired with the other's; the rest alone."""
    pairs = [(m, m) for m in a if m in b]
    if label_a != label_b and label_a in a and label_b in b:
        pairs.append((label_a, label_b))
    pairs += [(m, None) for m in a if all(m != p[0] for p in pairs)]
    pairs += [(None, m) for m in b if all(m != p[1] for p in pairs)]
    return sorted(pairs, key=lambda p: model_order(p[0] or p[1]))


def deltas(a: Results, b: Results, label_a: str, label_b: str) -> pl.DataFrame:
    """One row per model pair and column (tasks, avg): A, B, B - A, its interval, pairing, whether it excludes 0."""
    columns = [*a.tasks, *(t for t in b.tasks if t not in a.tasks), "avg"]
    rows = []
    for ma, mb in model_pairs(a.models, b.models, label_a, label_b):
        for column in columns:
            va = a.mean(ma, column) if ma else None
            vb = b.mean(mb, column) if mb else None
            row = {"model_a": ma, "model_b": mb, "column": column, "a": va, "b": vb,
                   "delta": vb - va if va is not None and vb is not None else None}
            ea = a.estimate(ma, column) if ma else None
            eb = b.estimate(mb, column) if mb else None
            if ea is not None and eb is not None:
                lo, hi = interval((eb - ea).draws)
                row |= {"lo": lo, "hi": hi, "pairing": eb.pairing(ea), "excludes_zero": lo > 0 or hi < 0}
            rows.append(row)
    return pl.DataFrame(rows, schema=SCHEMA)


def _load_sides(spec_a, spec_b, db) -> dict[str, Results | None]:
    from flowopd.spec import spec_hash

    with connect(db, read_only=True) as con:
        sides = {}
        for side, spec in (("A", spec_a), ("B", spec_b)):
            run_ids = current_run_ids(con, spec_hash=spec_hash(spec))
            sides[side] = load_runs(con, run_ids) if run_ids else None
    return sides


def compare_frame(path_a: str | Path, path_b: str | Path, db: str | Path = DEFAULT_DB) -> pl.DataFrame:
    """B - A with intervals for the latest runs of two specs (LedgerError if either has none)."""
    from flowopd.spec import load_spec

    spec_a, spec_b = load_spec(path_a), load_spec(path_b)
    sides = _load_sides(spec_a, spec_b, db)
    empty = [path for path, side in ((path_a, "A"), (path_b, "B")) if sides[side] is None]
    if empty:
        raise LedgerError(f"no eval run of {', '.join(map(str, empty))} in the ledger {db}")
    return deltas(sides["A"], sides["B"], spec_a.label, spec_b.label)


def _show(value) -> str:
    return repr(value) if value is MISSING else json.dumps(value)


def compare(path_a: str | Path, path_b: str | Path, db: str | Path = DEFAULT_DB) -> str:
    """Differing spec fields (old -> new), then the deltas of the latest run per model of each spec."""
    from flowopd.spec import load_spec, spec_hash

    spec_a, spec_b = load_spec(path_a), load_spec(path_b)
    hash_a, hash_b = spec_hash(spec_a), spec_hash(spec_b)
    out = [f"A = {path_a} ({hash_a[:12]}), B = {path_b} ({hash_b[:12]})"]
    diff = spec_diff(spec_a.model_dump(mode="json"), spec_b.model_dump(mode="json"))
    out.append(f"fields that differ ({len(diff)}):" if diff else "the specs resolve identically")
    out += [f"  {path}: {_show(old)} -> {_show(new)}" for path, old, new in diff]
    if not Path(db).is_file():
        return "\n".join([*out, f"no ledger at {db} yet: no results for either spec"]) + "\n"
    sides = _load_sides(spec_a, spec_b, db)
    for side, path, h in (("A", path_a, hash_a), ("B", path_b, hash_b)):
        if sides[side] is None:
            out.append(f"no results yet for {side} = {path} (spec_hash {h[:12]}): no eval run of this spec "
                       "in the ledger (an eval stage shared with another spec is recorded under that spec)")
    if any(s is None for s in sides.values()):
        return "\n".join(out) + "\n"
    frame = deltas(sides["A"], sides["B"], spec_a.label, spec_b.label)
    rows = []
    for r in frame.iter_rows(named=True):
        name = r["model_a"] if r["model_a"] == r["model_b"] else f"{r['model_a'] or '-'} -> {r['model_b'] or '-'}"
        excludes = "" if r["excludes_zero"] is None else "yes" if r["excludes_zero"] else "no"
        rows.append((name, r["column"], r["a"], r["b"], r["delta"], r["lo"], r["hi"], r["pairing"], excludes))
    out.append("headline metric per task (mean over prompts and seeds) and avg, latest run per model of each spec; "
               "lo, hi: 95% bootstrap interval of B - A:")
    header = ["model (A -> B)", "column", "A", "B", "B - A", "lo", "hi", "pairing", "excludes 0"]
    return "\n".join(out) + "\n" + format_rows(header, rows)

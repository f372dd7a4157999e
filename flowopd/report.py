"""The report: paper-style tables, plots and image grids from the ledger (Polars queries over DuckDB).

`build` writes, for the current pipeline's eval shards (their run_ids pick the current rows of a ledger that keeps
the whole history):
- `main_table.csv` / `main_table.md`: one row per model label, one column per task (headline metric, mean over
  seeds; Markdown: mean ± std over seeds) and `avg` = mean over tasks of headline / normaliser (the paper's
  Avg = mean(GenEval, OCR, DeQA/5, PickScore/26));
- `plots/tasks.png` (per-task bars per model, seed std as error bars), `plots/curves_<phase>.png` (training curves);
- `grids/<model>_<task>.png` (the eval shards' sample grids) and `README.md` linking them all.
`compare` prints the spec fields two specs differ in and the metric deltas of their latest runs.
Polars, DuckDB and matplotlib are imported inside functions (fast `flowopd` start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flowopd.artifacts import UMASK, atomic_folder, write_text
from flowopd.ledger import DEFAULT_DB, LedgerError, connect, shard_run_id

if TYPE_CHECKING:
    import polars as pl

DEFAULT_OUT = Path("reports")

# Headline values of the given eval runs, one row per (run, benchmark, seed).
HEADLINE_SQL = """
SELECT r.run_id, r.model, r.finished, r.parent_run_id, r.shard, r.spec_name, r.spec_hash, r.git_rev, r.git_dirty,
       b.benchmark, b.position, b.headline, b.normaliser, b.n, m.seed, m.value
FROM runs r
JOIN benchmarks b ON b.run_id = r.run_id
JOIN metrics m ON m.run_id = b.run_id AND m.benchmark = b.benchmark AND m.metric = b.headline
WHERE r.phase = 'eval' AND r.run_id IN (SELECT run_id FROM wanted)
"""
# The latest eval run per model label among the runs of one spec.
LATEST_SQL = """
SELECT run_id FROM runs WHERE phase = 'eval' AND spec_hash = ?
QUALIFY row_number() OVER (PARTITION BY model ORDER BY finished DESC NULLS LAST, run_id) = 1
"""
# Every metric of the given eval runs, mean over seeds.
BENCHMARK_SQL = """
SELECT r.model, m.benchmark, m.metric, avg(m.value) AS mean
FROM runs r JOIN metrics m ON m.run_id = r.run_id
WHERE r.run_id IN (SELECT run_id FROM wanted)
GROUP BY r.model, m.benchmark, m.metric
"""
CURVES_SQL = """
SELECT r.phase, r.model, c.key, c.step, c.value
FROM runs r JOIN curves c ON c.run_id = r.run_id
WHERE r.run_id IN (SELECT run_id FROM wanted)
ORDER BY r.phase, r.model, c.key, c.step
"""


def model_order(label: str) -> tuple:
    """Report row order: base, teacher:* sorted, mixed_grpo, flow_opd, flow_opd:* sorted, anything else sorted."""
    if label == "base":
        return (0, label)
    if label.startswith("teacher:"):
        return (1, label)
    if label == "mixed_grpo":
        return (2, label)
    if label == "flow_opd":
        return (3, label)
    if label.startswith("flow_opd:"):
        return (4, label)
    return (5, label)


def safe_name(label: str) -> str:
    """A model label as a file name: 'teacher:text' -> 'teacher-text'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


def headline_values(con, run_ids: list[str]) -> pl.DataFrame:
    """The headline rows of `run_ids`, keeping the latest run per model label (the others are noted)."""
    import polars as pl

    con.register("wanted", pl.DataFrame({"run_id": run_ids}, schema={"run_id": pl.String}))
    try:
        values = con.sql(HEADLINE_SQL).pl()
    finally:
        con.unregister("wanted")
    runs = values.select("model", "run_id", "finished").unique().sort("finished", "run_id", nulls_last=False)
    latest = runs.group_by("model").agg(pl.col("run_id").last())
    dropped = runs.join(latest, on=["model", "run_id"], how="anti")
    for model, run_id in dropped.select("model", "run_id").iter_rows():
        print(f"note: {model}: run {run_id} is older than another current run of that label; not in the table",
              file=sys.stderr)
    return values.join(latest, on=["model", "run_id"], how="semi")


def summarise(values: pl.DataFrame) -> pl.DataFrame:
    """Per model and task: mean and (population) std over seeds of the headline, and its normalised mean."""
    import polars as pl

    return (
        values.group_by("model", "benchmark")
        .agg(
            mean=pl.col("value").mean(),
            std=pl.col("value").std(ddof=0),
            seeds=pl.col("seed").n_unique(),
            position=pl.col("position").min(),
            headline=pl.col("headline").first(),
            normaliser=pl.col("normaliser").first(),
            n=pl.col("n").first(),
        )
        .with_columns(normalised=pl.col("mean") / pl.col("normaliser"))
    )


def task_order(summary: pl.DataFrame) -> list[str]:
    import polars as pl

    order = summary.group_by("benchmark").agg(pl.col("position").min()).sort("position", "benchmark")
    return order["benchmark"].to_list()


def avg_per_seed(values: pl.DataFrame, tasks: list[str]) -> pl.DataFrame:
    """Per model: avg computed seed by seed (seeds that have every task), for the ± of avg."""
    import polars as pl

    per_seed = (
        values.group_by("model", "seed")
        .agg(avg=(pl.col("value") / pl.col("normaliser")).mean(), tasks=pl.col("benchmark").n_unique())
        .filter(pl.col("tasks") == len(tasks))
    )
    return per_seed.group_by("model").agg(avg_std=pl.col("avg").std(ddof=0))


def main_table(values: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(table, summary): table has `model`, one column per task (mean headline) and `avg`, in report row order.

    avg = mean over tasks of mean headline / normaliser; null for a model missing a task of the table.
    """
    import polars as pl

    summary = summarise(values)
    tasks = task_order(summary)
    wide = summary.pivot(on="benchmark", index="model", values="mean")
    avg = summary.group_by("model").agg(avg=pl.col("normalised").mean(), tasks=pl.len())
    avg = avg.with_columns(avg=pl.when(pl.col("tasks") == len(tasks)).then(pl.col("avg"))).drop("tasks")
    models = sorted(wide["model"].to_list(), key=model_order)
    order = pl.DataFrame({"model": models, "row": range(len(models))}, schema={"model": pl.String, "row": pl.Int64})
    table = order.join(wide, on="model").join(avg, on="model").sort("row")
    return table.select("model", *tasks, "avg"), summary


def _fmt(value, std=None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def markdown_table(table: pl.DataFrame, summary: pl.DataFrame, values: pl.DataFrame) -> str:
    """The main table as Markdown, cells mean ± std over seeds, and what the numbers are under it."""
    import polars as pl

    tasks = [c for c in table.columns if c not in ("model", "avg")]
    stds = {(m, b): s for m, b, s in summary.select("model", "benchmark", "std").iter_rows()}
    avg_std = dict(avg_per_seed(values, tasks).iter_rows())
    lines = ["| model | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for row in table.iter_rows(named=True):
        model = row["model"]
        cells = [_fmt(row[t], stds.get((model, t))) for t in tasks]
        avg = _fmt(row["avg"], avg_std.get(model))
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {avg} |")
    meta = summary.group_by("benchmark").agg(pl.col("headline", "normaliser", "n").first(), pl.col("seeds").max())
    info = {b: (h, z, n, s) for b, h, z, n, s in meta.iter_rows()}
    described = "; ".join(f"{t}: `{info[t][0]}` (normaliser {info[t][1]:g}, {info[t][2]} prompts, "
                          f"{info[t][3]} seeds)" for t in tasks)
    runs = values.select("model", "run_id", "spec_name", "git_rev", "git_dirty").unique()
    runs = sorted(runs.iter_rows(), key=lambda r: model_order(r[0]))
    return "\n".join([
        "# Main table",
        "",
        *lines,
        "",
        "Each task cell is the task's headline metric on its benchmark (the test prompts), mean ± std over the "
        "evaluation seeds (population std). Headline metrics: " + described + ".",
        "",
        ("`avg` = mean over tasks of headline / normaliser, as the paper's Avg = mean(GenEval, OCR, DeQA/5, "
         "PickScore/26); its ± is the std over seeds of the avg computed seed by seed. `–`: no result."),
        "",
        "Runs (ledger `run_id`; `flowopd ledger sql \"SELECT * FROM runs WHERE run_id = '...'\"`): "
        + ", ".join(f"{m} `{r}` ({s}, git {(g or '?')[:8]}{'+dirty' if d else ''})" for m, r, s, g, d in runs)
        + ".",
        "",
    ])


def quality_table(con, run_ids: list[str], benchmark: str) -> str:
    """The MAR table: every metric of the quality benchmark per model (mean over seeds), the models with and
    without MAR side by side (a one-line note when no run has that benchmark)."""
    import polars as pl

    con.register("wanted", pl.DataFrame({"run_id": run_ids}, schema={"run_id": pl.String}))
    try:
        rows = con.sql(BENCHMARK_SQL).pl().filter(pl.col("benchmark") == benchmark).drop("benchmark")
    finally:
        con.unregister("wanted")
    if rows.is_empty():
        return f"# MAR table\n\nNo evaluated model has a `{benchmark}` benchmark.\n"
    wide = rows.pivot(on="metric", index="model", values="mean")
    metrics = sorted(c for c in wide.columns if c != "model")
    lines = [f"# MAR table: the `{benchmark}` benchmark, every metric", "",
             "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row in sorted(wide.iter_rows(named=True), key=lambda r: model_order(r["model"])):
        lines.append(f"| {row['model']} | " + " | ".join(_fmt(row[m]) for m in metrics) + " |")
    lines += ["", ("Mean over evaluation seeds. Manifold Anchor Regularisation (MAR) keeps the student's steps near "
                   "the anchor's; compare `flow_opd` with `flow_opd:no_mar` (lambda 0) and `flow_opd:anchor_base` "
                   "(anchor = base)."), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- writing atomically
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same data, same bytes


def plot_tasks(summary: pl.DataFrame, tasks: list[str], models: list[str], path: Path) -> None:
    """One panel per task (tasks have their own scales): a bar per model, seed std as error bar."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(tasks), figsize=(2.2 + 1.1 * len(models) * len(tasks) ** 0.5, 3.4),
                                squeeze=False)
    colours = plt.get_cmap("tab10")
    stats = {(m, b): (mu, sd) for m, b, mu, sd in summary.select("model", "benchmark", "mean", "std").iter_rows()}
    for ax, task in zip(axes[0], tasks):
        heights = [stats.get((m, task), (float("nan"), 0.0)) for m in models]
        ax.bar(range(len(models)), [h[0] for h in heights], yerr=[h[1] for h in heights], capsize=3,
               color=[colours(i % 10) for i in range(len(models))])
        headline = summary.filter(summary["benchmark"] == task)["headline"][0]
        ax.set_title(f"{task} ({headline})")
        ax.set_xticks(range(len(models)), models, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def plot_curves(curves: pl.DataFrame, phase: str, path: Path) -> None:
    """One panel per curve key (loss, reward, kl, ...), a line per model; a faint raw line and a running mean."""
    import polars as pl

    plt = _pyplot()
    data = curves.filter(pl.col("phase") == phase)
    keys = sorted(set(data["key"].to_list()) - {"seconds"}, key=lambda k: (k not in ("loss", "reward"), k))
    figure, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, model in enumerate(sorted(data["model"].unique().to_list(), key=model_order)):
            line = data.filter((pl.col("key") == key) & (pl.col("model") == model)).sort("step")
            window = max(1, line.height // 50)
            smooth = line["value"].rolling_mean(window_size=window, min_samples=1)
            ax.plot(line["step"], line["value"], color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(line["step"], smooth, color=f"C{i}", label=model, linewidth=1.4)
        ax.set_title(f"{phase}: {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(figure, path)
    plt.close(figure)


def _readme(tasks_table: str, phases: list[str], grids: dict[str, dict[str, str]], tasks: list[str],
            mar: str) -> str:
    columns = tasks + sorted({t for g in grids.values() for t in g} - set(tasks))
    grid_table = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in sorted(grids, key=model_order):
        cells = [f"[{t}](grids/{grids[model][t]})" if t in grids[model] else "–" for t in columns]
        grid_table.append(f"| {model} | " + " | ".join(cells) + " |")
    lines = [
        "# Reports",
        "",
        "Written by the `report` stage (`python stages/report.py`) from the ledger; do not edit by hand.",
        "",
        ("- [main_table.md](main_table.md) / [main_table.csv](main_table.csv): one row per model, the headline "
         "metric per task (mean over seeds; Markdown: mean ± std) and the normalised average `avg`."),
        "- [plots/tasks.png](plots/tasks.png): per-task bars per model, error bars the std over seeds.",
        "- [mar_table.md](mar_table.md): every metric of the quality benchmark per model, with and without MAR.",
        *[f"- [plots/curves_{p}.png](plots/curves_{p}.png): training curves of the {p} phase, one line per model "
          "(faint: raw, solid: running mean)." for p in phases],
        ("- `ledger.duckdb`: every run ever ingested (tables runs, benchmarks, metrics, curves, artifacts), e.g. "
         "`flowopd ledger sql \"SELECT model, spec_name, finished FROM runs WHERE phase = 'eval'\"`."),
        "- `metrics/` and `curves/`: the per-stage DVC metrics and plots (`dvc metrics show`, `dvc plots show`).",
        "",
        ("Sample grids (`grids/<model>_<task>.png`): each model's first images of its first evaluation seed, the "
         "prompt under each image:"),
        "",
        *grid_table,
        "",
        tasks_table.replace("# Main table", "## Main table", 1),
        "![tasks](plots/tasks.png)",
        "",
        mar.replace("# MAR table", "## MAR table", 1),
    ]
    return "\n".join(lines)


def build(shards: list[str | Path], db: str | Path = DEFAULT_DB, out: str | Path = DEFAULT_OUT,
          quality_benchmark: str = "quality") -> pl.DataFrame:
    """Write the report of the current eval shards into `out`; returns the main table."""
    import polars as pl

    out = Path(out)
    run_of = {shard_run_id(s): Path(s) for s in shards}
    with connect(db, read_only=True) as con:
        known = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE phase = 'eval'").fetchall()}
        missing = [f"{path} (run {run_id})" for run_id, path in run_of.items() if run_id not in known]
        if missing:
            raise LedgerError(f"not in the ledger {db}, ingest first: " + ", ".join(missing))
        values = headline_values(con, list(run_of))
        mar = quality_table(con, values["run_id"].unique().to_list(), quality_benchmark)
        parents = values["parent_run_id"].drop_nulls().unique().to_list()
        con.register("wanted", pl.DataFrame({"run_id": parents}, schema={"run_id": pl.String}))
        curves = con.sql(CURVES_SQL).pl()
        con.unregister("wanted")
    table, summary = main_table(values)
    tasks, models = [c for c in table.columns if c not in ("model", "avg")], table["model"].to_list()
    markdown = markdown_table(table, summary, values)
    write_text(out / "main_table.csv", table.write_csv(float_precision=6))
    write_text(out / "main_table.md", markdown)
    write_text(out / "mar_table.md", mar)
    phases = sorted(curves["phase"].unique().to_list())
    with atomic_folder(out / "plots") as folder:
        plot_tasks(summary, tasks, models, folder / "tasks.png")
        for phase in phases:
            plot_curves(curves, phase, folder / f"curves_{phase}.png")
    grids: dict[str, dict[str, str]] = {}  # model -> task -> file name
    with atomic_folder(out / "grids") as folder:
        for model, run_id in values.select("model", "run_id").unique().iter_rows():
            for grid in run_of[run_id].glob("grid_*.png"):
                task = grid.stem.removeprefix("grid_")
                name = f"{safe_name(model)}_{task}.png"
                shutil.copyfile(grid, folder / name)
                grids.setdefault(model, {})[task] = name
    for folder in (out / "plots", out / "grids"):  # atomic_folder's temp folders are private
        os.chmod(folder, 0o777 & ~UMASK)
    write_text(out / "README.md", _readme(markdown, phases, grids, tasks, mar))
    return table


# ---------------------------------------------------------------- compare two specs
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


def spec_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(path, old, new) for every leaf that differs; a leaf absent on one side is `MISSING` there."""
    fa, fb = flatten(a), flatten(b)
    paths = list(fa) + [p for p in fb if p not in fa]
    return [(p, fa.get(p, MISSING), fb.get(p, MISSING)) for p in paths if fa.get(p, MISSING) != fb.get(p, MISSING)]


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING = _Missing()


def _show(value) -> str:
    return repr(value) if value is MISSING else json.dumps(value)


def compare(path_a: str | Path, path_b: str | Path, db: str | Path = DEFAULT_DB) -> str:
    """Differing spec fields (old -> new), then headline deltas of the latest run per model of each spec."""
    from flowopd.ledger import format_rows
    from flowopd.spec import load_spec, spec_hash

    spec_a, spec_b = load_spec(path_a), load_spec(path_b)
    hash_a, hash_b = spec_hash(spec_a), spec_hash(spec_b)
    out = [f"A = {path_a} ({hash_a[:12]}), B = {path_b} ({hash_b[:12]})"]
    diff = spec_diff(spec_a.model_dump(mode="json"), spec_b.model_dump(mode="json"))
    out.append(f"fields that differ ({len(diff)}):" if diff else "the specs resolve identically")
    out += [f"  {path}: {_show(old)} -> {_show(new)}" for path, old, new in diff]
    if not Path(db).is_file():
        return "\n".join([*out, f"no ledger at {db} yet: no results for either spec"]) + "\n"
    tables = {}
    with connect(db, read_only=True) as con:
        for side, h in (("A", hash_a), ("B", hash_b)):
            run_ids = [r[0] for r in con.execute(LATEST_SQL, [h]).fetchall()]
            tables[side] = main_table(headline_values(con, run_ids))[0] if run_ids else None
    for side, path, h in (("A", path_a, hash_a), ("B", path_b, hash_b)):
        if tables[side] is None:
            out.append(f"no results yet for {side} = {path} (spec_hash {h[:12]}): no eval run of this spec "
                       "in the ledger (an eval stage shared with another spec is recorded under that spec)")
    if any(t is None for t in tables.values()):
        return "\n".join(out) + "\n"
    rows = _deltas(tables["A"], tables["B"], spec_a.label, spec_b.label)
    out.append("headline metric per task (mean over seeds) and avg; latest run per model of each spec:")
    return "\n".join(out) + "\n" + format_rows(["model (A -> B)", "task", "A", "B", "B - A"], rows)


def _deltas(a: pl.DataFrame, b: pl.DataFrame, label_a: str, label_b: str) -> list[tuple]:
    """Rows pair models by label; each spec's own model (its label) is paired with the other's."""
    rows_a = {r["model"]: r for r in a.iter_rows(named=True)}
    rows_b = {r["model"]: r for r in b.iter_rows(named=True)}
    pairs = [(m, m) for m in rows_a if m in rows_b]
    if label_a != label_b and label_a in rows_a and label_b in rows_b:
        pairs.append((label_a, label_b))
    pairs += [(m, None) for m in rows_a if all(m != p[0] for p in pairs)]
    pairs += [(None, m) for m in rows_b if all(m != p[1] for p in pairs)]
    columns = [c for c in a.columns if c != "model"] + [c for c in b.columns if c != "model" and c not in a.columns]
    result = []
    for ma, mb in sorted(pairs, key=lambda p: model_order(p[0] or p[1])):
        name = ma if ma == mb else f"{ma or '-'} -> {mb or '-'}"
        for column in columns:
            va = rows_a[ma].get(column) if ma else None
            vb = rows_b[mb].get(column) if mb else None
            delta = vb - va if va is not None and vb is not None else None
            result.append((name, column, va, vb, delta))
    return result


# ---------------------------------------------------------------- command line
def cmd_build(args) -> int:
    try:
        table = build(args.shards, args.db, args.out, args.quality_benchmark)
    except LedgerError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{args.out}: main table of {table.height} model(s), plots, grids, README.md")
    return 0


def cmd_compare(args) -> int:
    from flowopd.spec import SpecError

    try:
        sys.stdout.write(compare(args.a, args.b, args.db))
    except (LedgerError, SpecError) as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    return 0


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARD", help="the current eval shard folders")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--quality-benchmark", default="quality",
                        help="the benchmark of the MAR table (the MAR anchor's task; default quality)")


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register `report build|compare` on the `flowopd` subparsers."""
    parser = subparsers.add_parser("report", help="tables, plots and grids from the ledger; compare two specs")
    sub = parser.add_subparsers(dest="report_command", required=True, metavar="{build,compare}")
    p = sub.add_parser("build", help="write the main table, plots, grids and README.md for these eval shards")
    _build_arguments(p)
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("compare", help="spec fields that differ (old -> new) and the metric deltas of their runs")
    p.add_argument("a", metavar="A.yaml")
    p.add_argument("b", metavar="B.yaml")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"ledger file (default {DEFAULT_DB})")
    p.set_defaults(func=cmd_compare)
    return parser


def stage_main(argv: list[str] | None = None) -> int:
    """`python stages/report.py --db reports/ledger.duckdb --out reports SHARD...`, what the DVC stage runs."""
    parser = argparse.ArgumentParser(prog="stages/report.py", description="write the report of the eval shards")
    _build_arguments(parser)
    return cmd_build(parser.parse_args(argv))

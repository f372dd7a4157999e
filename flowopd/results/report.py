"""The report: what the `report` stage writes into `reports/` from the ledger, for the current pipeline's eval shards
(their run_ids pick the current rows of a ledger that keeps the whole history).

- `main_table.csv` / `.md` / `.tex`: one row per model label of the main evaluation setting, per task the headline
  metric (mean over training seeds of the mean over prompt rows and evaluation seeds) and `avg` = mean over tasks of
  headline / normaliser (the paper's Avg = mean(GenEval, OCR, DeQA/5, PickScore/26)), each with its 95% bootstrap
  interval (`<column>_lo`, `<column>_hi`; `flowopd/results/bootstrap.py`); the CSV adds `n_seeds` and `n_prompts`;
- `claims.csv`: the paper's claims, one row per comparison (`flowopd/results/claims.py`);
- `rescue.csv`: per task, the samples every teacher fails and the student's and a retrained teacher's rescue rates
  on them (`flowopd/results/rescue.py`, the claim `rescue_all_teachers_fail`);
- `mar_table.md` (every metric of the quality benchmark), `exploit_table.md` (share of prompt-ignoring samples);
- `validation.csv` / `.md`: the evaluations of the validation prompts (the sweeps), one row per label and task
  (`flowopd/results/validation_table.py`); written only when there are some, and a section of `README.md` then;
- `plots/tasks.png`, `plots/curves_<phase>.png`, `grids/<model>_<task>.png`, and `README.md` indexing them all,
  with the paper's claims rendered from claims.csv and a table per other evaluation
  setting (an ablation of `evaluation`); under each table, the run and shard every row comes from.
The numbers come from `flowopd.results.tables` (the same frames a notebook gets) and are rendered by `flowopd.results.formats`.
Polars, DuckDB and matplotlib are imported inside functions (fast `flowopd` start-up).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from flowopd.results.ledger import DEFAULT_DB, connect, shard_run_id
from flowopd.runtime.artifacts import UMASK, atomic_folder, write_text

if TYPE_CHECKING:
    import polars as pl

    from flowopd.results.tables import Results

DEFAULT_OUT = Path("reports")
DIGITS = 3  # decimals of every number the report prints (CSV: 6)
VALIDATION_FILES = ("validation.csv", "validation.md")  # only when there are val evaluations
CURVES_SQL = """
SELECT r.phase, r.model, {seed} AS training_seed, c.key, c.step, c.value
FROM runs r JOIN curves c ON c.run_id = r.run_id
WHERE r.run_id IN (SELECT run_id FROM wanted)
ORDER BY r.phase, r.model, training_seed, c.key, c.step
"""


def intervals_text() -> str:
    from flowopd.results.bootstrap import RESAMPLES

    return ("[lo, hi]: the 95% bootstrap confidence interval of the mean (a row's training seeds resampled, then the "
            "distinct prompt texts, each with all its prompt rows and evaluation seeds; "
            f"{RESAMPLES:,} resamples, fixed seed; `flowopd/results/bootstrap.py`)")


def safe_name(label: str) -> str:
    """A model label as a file name: 'teacher:text' -> 'teacher-text'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"


def provenance(values: pl.DataFrame) -> str:
    """Which run each row comes from: a Markdown table of label, ledger run_id, eval shard, spec and git."""
    from flowopd.results.tables import model_order

    runs = values.select("model", "training_seed", "run_id", "shard", "spec_name", "git_rev", "git_dirty",
                         "evaluation").unique()
    runs = sorted(runs.iter_rows(), key=lambda r: (model_order(r[0]), r[1]))
    settings = ", ".join(sorted({f"`{(e or '?')[:10]}`" for *_, e in runs}))
    lines = [(f"Rows of evaluation setting {settings} (the eval sub-spec's hash), each from one run per training "
              "seed (ledger `run_id`; `flowopd ledger sql \"SELECT * FROM runs WHERE run_id = '...'\"`):"), "",
             "| row | training seed | run_id | shard | spec | git |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {seed} | `{r}` | `{shard}` | {spec} | {(g or '?')[:8]}{'+dirty' if d else ''} |"
              for m, seed, r, shard, spec, g, d, _ in runs]
    return "\n".join(lines)


def _span(values: list) -> str:
    """'16', or '16-20' where the rows differ; '?' where unknown."""
    known = sorted({v for v in values if v is not None})
    return "?" if not known else str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"


def design_text(results: Results, frame: pl.DataFrame) -> str:
    """What the cells were measured on, from the data: per task the headline, distinct prompts, prompt rows and
    evaluation seeds; then the training seeds of the rows."""
    import polars as pl

    info = results.values.group_by("benchmark").agg(pl.col("headline", "normaliser").first(), pl.col("n"),
                                                    pl.col("seed").n_unique())
    info = {b: (h, z, n, s) for b, h, z, n, s in info.iter_rows()}
    prompts = {} if results.prompts is None else dict(
        results.prompts.group_by("benchmark").agg(pl.col("prompts")).iter_rows())
    described = "; ".join(
        f"{t}: `{info[t][0]}` (normaliser {info[t][1]:g}; {_span(prompts.get(t, [None]))} distinct prompts in "
        f"{_span(info[t][2])} prompt rows; {info[t][3]} evaluation seeds)" for t in results.tasks)
    by_count: dict[int, list[str]] = {}
    for model, n in frame.select("model", "n_seeds").iter_rows():
        if n is not None:
            by_count.setdefault(n, []).append(model)
    if len(by_count) == 1:
        n = next(iter(by_count))
        seeds = f"{n} training seed{'s' * (n != 1)} (trained model{'s' * (n != 1)}) per row"
    else:
        seeds = "training seeds per row: " + "; ".join(f"{n}: {', '.join(models)}"
                                                       for n, models in sorted(by_count.items(), reverse=True))
    return f"Headline metrics: {described}. {seeds[0].upper()}{seeds[1:]}." if by_count else \
        f"Headline metrics: {described}."


def main_markdown(results: Results, frame: pl.DataFrame) -> str:
    """The main table as Markdown, cells mean [lo, hi], and what the numbers are under it."""
    from flowopd.results.formats import markdown

    missing = "" if results.estimates else " The ledger holds no per-sample scores for these runs: no intervals."
    return "\n".join([
        "# Main table", "", markdown(frame, DIGITS),
        ("Each task cell is the task's headline metric on its benchmark (the test prompts): the mean over a row's "
         "training seeds of each trained model's mean over prompt rows and evaluation seeds; a prompt text may fill "
         f"several rows. {intervals_text()}. Bold: the best value of each column. "
         f"{design_text(results, frame)}{missing}"), "",
        ("`avg` = mean over tasks of headline / normaliser, as the paper's Avg = mean(GenEval, OCR, DeQA/5, "
         "PickScore/26); its interval resamples the training seeds once for every task and each task's prompts. "
         "Two rows evaluated on the same prompts and seeds share their resamples, so their difference has a paired "
         "interval (`flowopd report compare`, the claims in `README.md`), often much narrower than the two rows' "
         "intervals suggest. `n_seeds`, `n_prompts` and the training budget of each row (`train_images`, "
         "`train_cpu_s`: its own phase and every phase it descends from, the base left out) are in "
         "`main_table.csv`. `–`: no result."), "",
        provenance(results.values), "",
    ])


def other_settings_markdown(groups: list[Results]) -> str:
    """Rows evaluated under settings other than the main one (an ablation of `evaluation`): a table each."""
    from flowopd.results.formats import markdown

    if not groups:
        return ""
    lines = ["## Other evaluation settings", "",
             ("Rows evaluated under other evaluation settings (other prompts, seeds or benchmarks): not comparable "
              f"with the main table, so neither in it nor in the claims; {intervals_text()}."), ""]
    for results in groups:
        lines += [markdown(results.main_table(), DIGITS), provenance(results.values), ""]
    return "\n".join(lines)


def mar_markdown(frame: pl.DataFrame, benchmark: str) -> str:
    from flowopd.results.formats import markdown

    if frame.height == 0:
        return f"# MAR table\n\nNo evaluated model has a `{benchmark}` benchmark.\n"
    return "\n".join([
        f"# MAR table: the `{benchmark}` benchmark, every metric", "", markdown(frame, DIGITS),
        (f"Mean over prompts and seeds; {intervals_text()}. Manifold Anchor Regularisation (MAR) keeps the student's steps "
         "near the anchor's; compare `flow_opd` with `flow_opd:no_mar` (lambda 0) and `flow_opd:anchor_base` "
         "(anchor = base)."), ""])


def exploit_markdown(frame: pl.DataFrame) -> str:
    from flowopd.results.formats import markdown
    from flowopd.results.tables import EXPLOIT_METRIC

    if frame.height == 0:
        return (f"# Exploit table\n\nNo evaluated model records `{EXPLOIT_METRIC}` (the evaluation's prompt-ignoring "
                "detector): nothing to show.\n")
    return "\n".join([
        "# Exploit table: share of prompt-ignoring samples", "", markdown(frame, DIGITS, best="min"),
        ("Per model and benchmark, the share of samples (prompts x seeds) the evaluation's detector flags as "
         f"ignoring the prompt (`{EXPLOIT_METRIC}`): a reward that scores high on such images is being exploited. "
         f"Lower is better (bold: lowest); {intervals_text()}."), ""])


def rescue_markdown(rescue: pl.DataFrame) -> str:
    """The rescue table (rescue.csv) as Markdown, `–` where a number is unknown."""
    from flowopd.results.rescue import FAIL

    def shown(value, digits=DIGITS):
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [(f"[rescue.csv](rescue.csv): per task, F = the samples (prompt row x evaluation seed) on which every "
              f"teacher of a training seed scores below {FAIL:g} (normalised headline), `failures` = |F| summed over "
              f"training seeds; a model rescues a sample when it scores at least {FAIL:g} there and "
              "`prompt_ignoring` does not flag it; `student_rate`: `flow_opd` of the same seed, `control_rate`: the "
              "task's teacher of the next training seed, `student_other_seeds_rate`: `flow_opd` of the other "
              "training seeds, not distilled from the teachers that failed (`flowopd/results/rescue.py`)."), "",
             "| " + " | ".join(rescue.columns) + " |", "|---" * rescue.width + "|"]
    lines += ["| " + " | ".join(shown(v) for v in row) + " |" for row in rescue.iter_rows()]
    return "\n".join(lines)


def claims_markdown(claims: pl.DataFrame, rescue: pl.DataFrame | None = None) -> str:
    from flowopd.results.claims import claim_lines

    return "\n".join([
        "## The paper's claims", "",
        ("[claims.csv](claims.csv) holds one row per comparison (claim, metric, estimate, lo, hi, margin, verdict, "
         "n_seeds, n_prompts); this section renders it. Each comparison is a difference of means d = a − b on the "
         "normalised scale (headline / normaliser), with its bootstrap interval [lo, hi] (training seeds, then "
         "distinct prompts resampled; paired where both rows were evaluated on the same prompts and seeds), "
         "Bonferroni-corrected over all m rows of the file so that all intervals hold together at 95%. "
         "`student_matches_teachers` is an equivalence test: **holds** when −margin < lo and hi < margin, "
         "**fails** when the interval lies wholly outside (−margin, margin). `seesaw_offtask` and "
         "`mixed_interference` claim a drop of at least the margin: **holds** when hi < −margin, **fails** when "
         "lo > −margin. The other claims are superiority by at least the smallest "
         "effect worth reporting: **holds** when lo > margin, **fails** when hi < margin (the data exclude an "
         "effect that large); `rescue_all_teachers_fail` compares rescue rates (below the claims), not means. "
         "**unresolved**: the interval contains the threshold, or a row the comparison needs "
         "is missing or has no per-sample scores (named). A claim of several comparisons holds when all hold, "
         "fails when any fails, and is unresolved otherwise. `n_seeds`, `n_prompts`: the training seeds and "
         "distinct test prompts the interval rests on (the smaller of the two rows). Computed by "
         "`flowopd/results/claims.py` (`flowopd report claims`)."), "",
        *claim_lines(claims, DIGITS), "", *([rescue_markdown(rescue), ""] if rescue is not None else [])])


# ---------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same data, same bytes


def plot_tasks(results: Results, frame: pl.DataFrame, path: Path) -> None:
    """One panel per task (tasks have their own scales): a bar per model, the 95% interval as error bar."""
    plt = _pyplot()
    tasks, models = results.tasks, frame["model"].to_list()
    figure, axes = plt.subplots(1, len(tasks), figsize=(2.2 + 1.1 * len(models) * len(tasks) ** 0.5, 3.4),
                                squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, task in zip(axes[0], tasks):
        means = [v if v is not None else float("nan") for v in frame[task].to_list()]
        bounds = zip(frame[f"{task}_lo"].to_list(), frame[f"{task}_hi"].to_list())
        # clamped at 0: a zero-width interval's bounds may miss its mean by a rounding error
        errors = [(max(m - lo, 0.0), max(hi - m, 0.0)) if lo is not None else (0.0, 0.0)
                  for m, (lo, hi) in zip(means, bounds)]
        ax.bar(range(len(models)), means, yerr=list(zip(*errors)) if errors else None, capsize=3,
               color=[colours(i % 10) for i in range(len(models))])
        ax.set_title(f"{task} ({results.headline[task]})")
        ax.set_xticks(range(len(models)), models, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def plot_curves(curves: pl.DataFrame, phase: str, path: Path) -> None:
    """One panel per curve key (loss, reward, kl, ...), a line per model and training seed; a faint raw line and a
    running mean."""
    import polars as pl

    from flowopd.results.tables import model_order

    plt = _pyplot()
    data = curves.filter(pl.col("phase") == phase)
    keys = sorted(set(data["key"].to_list()) - {"seconds"}, key=lambda k: (k not in ("loss", "reward"), k))
    figure, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2), squeeze=False)
    runs = sorted(data.select("model", "training_seed").unique().iter_rows(), key=lambda r: (model_order(r[0]), r[1]))
    seeded = {model for model, _ in runs if sum(m == model for m, _ in runs) > 1}  # several training seeds
    for ax, key in zip(axes[0], keys):
        for i, (model, seed) in enumerate(runs):
            line = data.filter((pl.col("key") == key) & (pl.col("model") == model)
                               & (pl.col("training_seed") == seed)).sort("step")
            window = max(1, line.height // 50)
            smooth = line["value"].rolling_mean(window_size=window, min_samples=1)
            label = f"{model} (seed {seed})" if model in seeded else model
            ax.plot(line["step"], line["value"], color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(line["step"], smooth, color=f"C{i}", label=label, linewidth=1.4)
        ax.set_title(f"{phase}: {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(figure, path)
    plt.close(figure)


# ---------------------------------------------------------------- README and build
def _readme(main: str, phases: list[str], grids: dict[str, dict[str, str]], tasks: list[str], mar: str,
            exploit: str, claims: str, has_exploit: bool, others: str = "", validation: str = "") -> str:
    from flowopd.results.tables import model_order

    columns = tasks + sorted({t for g in grids.values() for t in g} - set(tasks))
    grid_table = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in sorted(grids, key=model_order):
        cells = [f"[{t}](grids/{grids[model][t]})" if t in grids[model] else "–" for t in columns]
        grid_table.append(f"| {model} | " + " | ".join(cells) + " |")
    exploit_line = ("share of samples flagged as ignoring the prompt, per model and benchmark" if has_exploit else
                    "empty: no evaluated model records `prompt_ignoring`")
    lines = [
        "# Reports", "",
        "Written by the `report` stage (`python stages/report.py`) from the ledger; do not edit by hand.", "",
        ("- [main_table.md](main_table.md) / [main_table.csv](main_table.csv) / [main_table.tex](main_table.tex): "
         "one row per model, the headline metric per task and the normalised average `avg`, each the mean over "
         "training seeds, prompts and evaluation seeds with its 95% bootstrap interval (CSV: `<column>_lo`, "
         "`<column>_hi`, and the row's `n_seeds` and `n_prompts`; TeX: a booktabs tabular for `\\input`)."),
        "- [claims.csv](claims.csv): the paper's claims, one row per comparison (rendered below).",
        ("- [rescue.csv](rescue.csv): per task, the samples every teacher fails and the rates at which the student "
         "and a retrained teacher rescue them (rendered below the claims)."),
        "- [plots/tasks.png](plots/tasks.png): per-task bars per model, error bars the 95% intervals.",
        "- [mar_table.md](mar_table.md): every metric of the quality benchmark per model, with and without MAR.",
        f"- [exploit_table.md](exploit_table.md): {exploit_line}.",
        *([("- [validation.md](validation.md) / [validation.csv](validation.csv): the evaluations of the validation "
            "prompts (the sweeps), where the specs' values are chosen (rendered below the main table).")]
          if validation else []),
        *[f"- [plots/curves_{p}.png](plots/curves_{p}.png): training curves of the {p} phase, one line per model "
          "(faint: raw, solid: running mean)." for p in phases],
        ("- `ledger.duckdb`: every run ever ingested (tables runs, benchmarks, metrics, samples, curves, artifacts), "
         "e.g. `flowopd ledger sql \"SELECT model, spec_name, finished FROM runs WHERE phase = 'eval'\"`."),
        "- `metrics/` and `curves/`: the per-stage DVC metrics and plots (`dvc metrics show`, `dvc plots show`).", "",
        claims,
        ("Sample grids (`grids/<model>_<task>.png`): each row's first images (its first training seed's model, "
         "first evaluation seed), the prompt under each image:"), "",
        *grid_table, "",
        main.replace("# Main table", "## Main table", 1),
        "![tasks](plots/tasks.png)", "",
        *([validation.replace("# Validation", "## Validation", 1)] if validation else []),
        mar.replace("# MAR table", "## MAR table", 1),
        *([exploit.replace("# Exploit table", "## Exploit table", 1)] if has_exploit else []),
        *([others] if others else []),
    ]
    return "\n".join(lines)


def build(shards: list[str | Path], db: str | Path = DEFAULT_DB, out: str | Path = DEFAULT_OUT,
          quality_benchmark: str = "quality") -> pl.DataFrame:
    """Write the report of the current eval shards into `out`; returns the main table."""
    from flowopd.results import formats as render
    from flowopd.results import tables
    from flowopd.results.claims import claims_frame, csv_frame
    from flowopd.results.rescue import rescue_frame
    from flowopd.results.validation_table import load_validation, validation_frame, validation_markdown

    out = Path(out)
    with connect(db, read_only=True) as con:
        run_ids = tables.current_run_ids(con, shards, db)
        results, *others = tables.load_groups(con, run_ids)  # the main evaluation setting's rows first
        validation_table = validation_frame(load_validation(con, run_ids))
        parents = results.values["parent_run_id"].drop_nulls().unique().to_list()
        curves = tables.query_runs(con, CURVES_SQL, parents)
    shard_of = {shard_run_id(s): Path(s) for s in shards}
    frame = results.main_table()
    main, mar_frame, exploit_frame = (main_markdown(results, frame), results.metric_table(quality_benchmark),
                                      results.exploit_table())
    mar, exploit = mar_markdown(mar_frame, quality_benchmark), exploit_markdown(exploit_frame)
    claims_table, rescue_table = claims_frame(results, quality_benchmark), rescue_frame(results)
    claims = claims_markdown(claims_table, rescue_table)
    caption = ("Main table: headline metric per task and avg (mean of headline / normaliser), mean over training "
               "seeds, prompts and evaluation seeds, [95% bootstrap interval]; bold: best per column.")
    write_text(out / "main_table.csv", render.csv(frame))
    write_text(out / "claims.csv", render.csv(csv_frame(claims_table)))
    write_text(out / "rescue.csv", render.csv(rescue_table))
    write_text(out / "main_table.md", main)
    write_text(out / "main_table.tex", render.latex(frame, DIGITS, caption=caption))
    write_text(out / "mar_table.md", mar)
    write_text(out / "exploit_table.md", exploit)
    validation = validation_markdown(validation_table, DIGITS, intervals_text()) if validation_table.height else ""
    if validation:  # no val evaluations: no files, no section
        write_text(out / "validation.csv", render.csv(validation_table))
        write_text(out / "validation.md", validation)
    phases = sorted(curves["phase"].unique().to_list())
    with atomic_folder(out / "plots") as folder:
        plot_tasks(results, frame, folder / "tasks.png")
        for phase in phases:
            plot_curves(curves, phase, folder / f"curves_{phase}.png")
    grids: dict[str, dict[str, str]] = {}  # model -> task -> file name
    with atomic_folder(out / "grids") as folder:
        shown = results.values.select("model", "training_seed", "run_id").unique().sort("model", "training_seed")
        for model, _, run_id in shown.unique("model", keep="first", maintain_order=True).iter_rows():  # first seed
            for grid in shard_of[run_id].glob("grid_*.png"):
                task = grid.stem.removeprefix("grid_")
                name = f"{safe_name(model)}_{task}.png"
                shutil.copyfile(grid, folder / name)
                grids.setdefault(model, {})[task] = name
    for folder in (out / "plots", out / "grids"):  # atomic_folder's temp folders are private
        os.chmod(folder, 0o777 & ~UMASK)
    write_text(out / "README.md", _readme(main, phases, grids, results.tasks, mar, exploit, claims,
                                          exploit_frame.height > 0, other_settings_markdown(others), validation))
    return frame

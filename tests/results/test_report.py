"""Report: main table rows, columns, avg and intervals on known numbers; Markdown, CSV and LaTeX (parsed back);
plots, grids, README with the claims; MAR and exploit tables; compare and `report table` from the command line."""

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_ledger import make_model, make_shard

from flowopd.cli import main
from flowopd.results.compare import flatten, spec_diff
from flowopd.results.ledger import ingest, shard_run_id
from flowopd.results.report import build, safe_name
from flowopd.results.tables import model_order
from flowopd.spec import load_spec, spec_hash

SPECS = Path(__file__).parents[2] / "specs"
HEADLINE = {"text": "score", "objects": "strict", "quality": "score"}


def tasks_with(text, objects, quality):
    return {"text": {"score": text, "exact": [0.0, 0.0]}, "objects": {"strict": objects, "score": [1.0, 1.0]},
            "quality": {"score": quality}}


def scored(shift: dict[str, float], prompts: int = 24, seeds: int = 2, noise: float = 0.05, seed: int = 0,
           extra: dict | None = None) -> dict:
    """Per-sample headline scores {task: {metric: [[score per prompt] per seed]}}: a prompt difficulty shared by
    every model (prompt i is the same prompt for all: correlated rows, as in a real evaluation), plus the model's
    shift per task and its own noise. extra: {task: {metric: [[...] per seed]}} added as they are."""
    rng, difficulty = np.random.default_rng(seed), np.random.default_rng(99).normal(0, 0.15, (3, prompts))
    samples = {}
    for i, (task, metric) in enumerate(HEADLINE.items()):
        scale = 5.0 if task == "quality" else 1.0
        values = scale * np.clip(0.5 + shift.get(task, 0.0) + difficulty[i] + rng.normal(0, noise, (seeds, prompts)),
                                 0, 1)
        samples[task] = {metric: values.tolist()}
    for task, metrics in (extra or {}).items():
        samples[task] |= metrics
    return samples


@pytest.fixture
def pipeline(tmp_path):
    """A ledger with an old run of `base` (history) and the current shards of six models."""
    db, root = tmp_path / "reports/ledger.duckdb", tmp_path / "artifacts"
    old = make_shard(root / "old/base", values=tasks_with([0.9, 0.9], [0.9, 0.9], [4.5, 4.5]))
    ingest([old], db)
    model = make_model(root / "base/m", curve=[{"step": s, "loss": 1.0 / (s + 1), "seconds": s} for s in range(60)])
    current = [
        make_shard(root / "eval/fo_nomar", "flow_opd:no_mar", tasks_with([0.6, 0.6], [0.6, 0.6], [3.0, 3.0])),
        make_shard(root / "eval/base", "base", tasks_with([0.2, 0.4], [0.5, 0.5], [2.0, 3.0]), model_dir=model),
        make_shard(root / "eval/tt", "teacher:text", tasks_with([0.9, 1.0], [0.1, 0.3], [1.0, 1.0])),
        make_shard(root / "eval/fo", "flow_opd", tasks_with([0.8, 0.8], [0.7, 0.7], [4.0, 4.0])),
        make_shard(root / "eval/mixed", "mixed_grpo", {"text": {"score": [0.5, 0.5]}}),  # one task only
        make_shard(root / "eval/to", "teacher:objects", tasks_with([0.1, 0.1], [0.9, 0.9], [1.0, 1.0])),
    ]
    ingest(current, db)
    return db, current, tmp_path / "reports"


SPREAD = {  # each model's shift per task over a shared prompt difficulty
    "base": {}, "teacher:objects": {"objects": 0.3}, "teacher:quality": {"quality": 0.2}, "teacher:text": {"text": 0.3},
    "mixed_grpo": {"text": 0.15, "objects": 0.15, "quality": 0.05},
    "flow_opd": {"text": 0.3, "objects": 0.2, "quality": 0.2}, "flow_opd:no_mar": {"text": 0.3, "objects": 0.2},
}


def spread_ledger(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """A ledger of seven models whose per-sample scores spread over prompts and seeds (intervals of some width)."""
    db, root = tmp_path / "reports/ledger.duckdb", tmp_path / "artifacts/eval"
    shards = [make_shard(root / safe_name(model), model, samples=scored(shift, seed=i))
              for i, (model, shift) in enumerate(SPREAD.items())]
    ingest(shards, db)
    return db, shards, tmp_path / "reports"


@pytest.fixture
def spread(tmp_path):
    return spread_ledger(tmp_path)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_model_order_and_file_names():
    labels = ["zeta", "flow_opd:no_mar", "teacher:text", "mixed_grpo:matched", "flow_opd", "base", "mixed_grpo",
              "teacher:objects"]
    assert sorted(labels, key=model_order) == ["base", "teacher:objects", "teacher:text", "mixed_grpo",
                                               "mixed_grpo:matched", "flow_opd", "flow_opd:no_mar", "zeta"]
    assert safe_name("teacher:text") == "teacher-text" and safe_name("flow_opd:no mar/x") == "flow_opd-no-mar-x"


def test_main_table_rows_columns_and_avg(pipeline):
    db, current, out = pipeline
    build(current, db, out)
    rows = read_csv(out / "main_table.csv")
    assert list(rows[0]) == ["model", *(f"{c}{s}" for c in ("text", "objects", "quality", "avg")
                                        for s in ("", "_lo", "_hi")), "n_seeds", "n_prompts", "train_images",
                         "train_cpu_s"]
    assert [r["model"] for r in rows] == ["base", "teacher:objects", "teacher:text", "mixed_grpo", "flow_opd",
                                          "flow_opd:no_mar"]
    assert {(r["n_seeds"], r["n_prompts"]) for r in rows} == {("1", "4")}  # one model each, 4 prompts per task
    assert {(r["train_images"], r["train_cpu_s"]) for r in rows} == {("", "")}  # made-up shards: no budgets
    counts = ("model", "n_seeds", "n_prompts", "train_images", "train_cpu_s")
    base = {k: float(v) for k, v in rows[0].items() if k not in counts}  # not the old 0.9
    means = {"text": 0.3, "objects": 0.5, "quality": 2.5, "avg": (0.3 + 0.5 + 2.5 / 5) / 3}
    # every prompt scores its seed's value, so each prompt's mean over seeds is the cell mean: no width
    assert base == pytest.approx({f"{c}{s}": v for c, v in means.items() for s in ("", "_lo", "_hi")})
    flow_opd = rows[4]
    assert float(flow_opd["avg"]) == pytest.approx((0.8 + 0.7 + 4.0 / 5) / 3)
    mixed = rows[3]
    assert float(mixed["text"]) == 0.5 and mixed["objects"] == mixed["quality"] == mixed["avg"] == mixed["avg_lo"] == ""


def test_markdown_shows_mean_interval_bold_best_and_explains_avg(pipeline):
    db, current, out = pipeline
    build(current, db, out)
    text = (out / "main_table.md").read_text()
    base_row = next(line for line in text.splitlines() if line.startswith("| base |"))
    assert base_row == "| base | 0.300 [0.300, 0.300] | 0.500 [0.500, 0.500] | 2.500 [2.500, 2.500] | 0.433 [0.433, 0.433] |"
    assert "| mixed_grpo | 0.500 [0.500, 0.500] | – | – | – |" in text
    assert "| teacher:text | **0.950** [0.950, 0.950] |" in text  # best text score, in bold
    assert "avg` = mean over tasks of headline / normaliser" in text and "quality: `score` (normaliser 5" in text
    assert "95% bootstrap confidence interval" in text and shard_run_id(current[1]) in text


def test_intervals_bracket_the_means_and_csv_keeps_six_decimals(spread):
    db, shards, out = spread
    build(shards, db, out)
    build(shards, db, out.parent / "again")
    for name in ("main_table.csv", "main_table.md", "main_table.tex", "README.md"):  # deterministic intervals
        assert (out / name).read_bytes() == (out.parent / "again" / name).read_bytes()
    rows = read_csv(out / "main_table.csv")
    for row in rows:
        for column in ("text", "objects", "quality", "avg"):
            lo, mean, hi = (float(row[f"{column}{s}"]) for s in ("_lo", "", "_hi"))
            assert lo < mean < hi, (row["model"], column)
            assert re.fullmatch(r"-?\d+\.\d{1,6}", row[column])
    # the percentile interval of a mean of 24 prompt means is close to the normal one, 1.96 standard errors
    flow_opd = next(r for r in rows if r["model"] == "flow_opd")
    prompt_means = np.mean(scored(SPREAD["flow_opd"], seed=list(SPREAD).index("flow_opd"))["text"]["score"], axis=0)
    half_width = 1.96 * prompt_means.std(ddof=1) / len(prompt_means) ** 0.5
    assert float(flow_opd["text"]) == pytest.approx(prompt_means.mean())
    assert (float(flow_opd["text_hi"]) - float(flow_opd["text_lo"])) / 2 == pytest.approx(half_width, rel=0.15)


def parse_latex(text: str) -> tuple[list[str], dict[str, dict]]:
    """(columns, {model: {column: (value, lo, hi, bold) or None}}) of a tabular that flowopd.results.formats.latex wrote."""
    assert text.count(r"\toprule") == text.count(r"\midrule") == text.count(r"\bottomrule") == 1
    header = text.split("\\toprule\n")[1].split("\\midrule")[0]
    body = text.split("\\midrule\n")[1].split("\\bottomrule")[0].replace("$-$", "-")
    columns = header.strip().removesuffix(r"\\").strip().split(" & ")[1:]
    cell = re.compile(r"(\\textbf\{)?(-?[0-9.]+)\}?(?: \{\\scriptsize \[(-?[0-9.]+), (-?[0-9.]+)\]\})?")
    rows = {}
    for line in body.strip().splitlines():
        model, *cells = line.removesuffix(r" \\").split(" & ")
        parsed = {}
        for column, text_cell in zip(columns, cells, strict=True):
            match = cell.fullmatch(text_cell)
            assert text_cell == "--" or match, text_cell
            parsed[column] = None if text_cell == "--" else (
                float(match[2]), *(float(x) if x else None for x in match.group(3, 4)), bool(match[1]))
        rows[model.replace(r"\_", "_")] = parsed
    return columns, rows


def test_latex_table_parses_back_to_the_same_numbers(spread):
    db, shards, out = spread
    table = build(shards, db, out)
    columns, rows = parse_latex((out / "main_table.tex").read_text())
    assert columns == ["text", "objects", "quality", "avg"] and list(rows) == table["model"].to_list()
    for record in table.iter_rows(named=True):
        for column in columns:
            value, lo, hi, bold = rows[record["model"]][column]
            expected = [round(record[f"{column}{s}"], 3) for s in ("", "_lo", "_hi")]
            assert [value, lo, hi] == pytest.approx(expected, abs=1e-12)
            assert bold == (value == max(round(v, 3) for v in table[column]))  # the values differ: a best
    assert sum(rows[m][c][3] for m in rows for c in columns) >= len(columns)  # a best value per column
    assert r"flow\_opd:no\_mar & " in (out / "main_table.tex").read_text()  # labels escaped for LaTeX


def test_plots_grids_and_readme(pipeline):
    db, current, out = pipeline
    (out / "grids").mkdir(parents=True)
    (out / "grids/stale_text.png").write_bytes(b"old")
    build(current, db, out)
    assert {p.name for p in (out / "plots").iterdir()} == {"tasks.png", "curves_base.png"}
    assert (out / "plots/tasks.png").read_bytes()[:4] == b"\x89PNG"
    grids = {p.name for p in (out / "grids").iterdir()}
    assert "teacher-text_objects.png" in grids and "flow_opd-no_mar_quality.png" in grids
    assert "stale_text.png" not in grids and len(grids) == 5 * 3 + 1
    readme = (out / "README.md").read_text()
    for target in ["main_table.md", "main_table.csv", "main_table.tex", "mar_table.md", "exploit_table.md",
                   "plots/tasks.png", "plots/curves_base.png", *(f"grids/{g}" for g in grids)]:
        assert f"]({target})" in readme
    # no model records the exploit metric: the table says so, the index too, and nothing else breaks
    assert "No evaluated model records `prompt_ignoring`" in (out / "exploit_table.md").read_text()
    assert "empty: no evaluated model records `prompt_ignoring`" in readme and "## Exploit table" not in readme


def test_exploit_table_shows_the_share_of_prompt_ignoring_samples(tmp_path):
    db, root = tmp_path / "ledger.duckdb", tmp_path / "eval"
    flags = {"text": [[1, 0, 0, 0] * 6, [1, 1, 0, 0] * 6], "objects": [[0] * 24, [0] * 23 + [1]]}  # 0/1 per sample
    shards = [
        make_shard(root / "base", "base", samples=scored({})),
        make_shard(root / "fo", "flow_opd", samples=scored({}, extra={t: {"prompt_ignoring": f}
                                                                      for t, f in flags.items()})),
        make_shard(root / "tt", "teacher:text", samples=scored({}, extra={"text": {"prompt_ignoring": [
            [True, False, False] * 8, [False] * 24]}})),  # booleans count as 0 / 1
    ]
    ingest(shards, db)
    build(shards, db, tmp_path / "reports")
    lines = (tmp_path / "reports/exploit_table.md").read_text().splitlines()
    assert lines[2] == "| model | text | objects |"
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"model", "teacher:text", "flow_opd"}  # base records no flags: not a row
    assert rows["flow_opd"].startswith("| flow_opd | 0.375 [") and " | 0.021 [0.000, " in rows["flow_opd"]
    assert rows["teacher:text"].startswith("| teacher:text | **0.167** [") and rows["teacher:text"].endswith(" – |")
    readme = (tmp_path / "reports/README.md").read_text()
    assert "## Exploit table" in readme and "share of samples flagged as ignoring the prompt" in readme
    main_csv = read_csv(tmp_path / "reports/main_table.csv")  # the flags do not enter the main table
    assert "prompt_ignoring" not in main_csv[0] and len(main_csv) == 3


def test_readme_renders_claims_csv(spread):
    db, shards, out = spread
    build(shards, db, out)
    readme = (out / "README.md").read_text()
    rows = read_csv(out / "claims.csv")
    assert list(rows[0]) == ["claim", "metric", "estimate", "lo", "hi", "margin", "verdict", "n_seeds", "n_prompts"]
    assert [r["claim"] for r in rows] == ["student_matches_teachers"] * 3 + [
        "student_above_mixed", "mar_quality", "cold_start_merge_vs_sft", "cold_start_merge_vs_none"] + [
        "seesaw_offtask"] * 6 + ["mixed_interference"] * 3 + ["student_exceeds_teachers"] * 3 + [
        "rescue_all_teachers_fail"] * 3 + ["reference_update"]
    assert {r["verdict"] for r in rows} <= {"holds", "fails", "unresolved"}
    assert "[claims.csv](claims.csv)" in readme and "Bonferroni, m = 23: each interval is the 99.78% " in readme
    section = readme.split("## The paper's claims", 1)[1].split("Sample grids", 1)[0]
    lines = {line.split("`")[1]: line for line in section.splitlines() if line.startswith("- `")}
    assert list(lines) == ["student_matches_teachers", "student_above_mixed", "mar_quality",
                           "cold_start_merge_vs_sft", "cold_start_merge_vs_none", "seesaw_offtask",
                           "mixed_interference", "student_exceeds_teachers", "rescue_all_teachers_fail",
                           "reference_update"]
    # one training seed and no prompt_ignoring flags: no rescue interval; rescue.csv and its README table are there
    assert "[rescue.csv](rescue.csv)" in readme and "| task | failures | student_rate | control_rate |" in section
    assert [r["task"] for r in read_csv(out / "rescue.csv")] == ["text", "objects", "quality"]
    assert {(r["verdict"], r["lo"]) for r in rows if r["claim"] == "rescue_all_teachers_fail"} == {("unresolved", "")}
    for row in rows:  # every comparison of the CSV, with its numbers, in its claim's line
        if row["lo"]:
            numbers = [f"{float(row[c]):+.3f}".replace("-", "−") for c in ("estimate", "lo", "hi")]
            assert f"= {numbers[0]} [{numbers[1]}, {numbers[2]}] (paired; 1 training seed, 24 distinct prompts): " \
                   f"{row['verdict']}" in lines[row["claim"]]
    mixed = next(r for r in rows if r["claim"] == "student_above_mixed")
    assert mixed["verdict"] == "holds" and float(mixed["lo"]) > 0.01 and mixed["margin"] == "0.010000"
    assert "lo > margin, margin 0.01: **holds**" in lines["student_above_mixed"]
    assert "−margin < lo and hi < margin, margin 0.03" in lines["student_matches_teachers"]
    sft = next(r for r in rows if r["claim"] == "cold_start_merge_vs_sft")
    assert sft["verdict"] == "unresolved" and sft["lo"] == sft["estimate"] == ""
    assert "unresolved (row flow_opd:sft_init missing)" in lines["cold_start_merge_vs_sft"]


def test_mar_table_lists_every_quality_metric_per_model(pipeline):
    db, current, out = pipeline
    build(current, db, out)
    lines = (out / "mar_table.md").read_text().splitlines()
    assert lines[2] == "| model | score |"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| model")]
    assert rows == ["| base | 2.500 [2.500, 2.500] |", "| teacher:objects | 1.000 [1.000, 1.000] |",
                    "| teacher:text | 1.000 [1.000, 1.000] |", "| flow_opd | **4.000** [4.000, 4.000] |",
                    "| flow_opd:no_mar | 3.000 [3.000, 3.000] |"]  # mixed_grpo has no quality benchmark
    assert "## MAR table" in (out / "README.md").read_text()


def test_build_refuses_shards_missing_from_the_ledger(pipeline, tmp_path, capsys):
    db, current, out = pipeline
    late = make_shard(tmp_path / "artifacts/eval/late", "flow_opd:late")
    assert main(["report", "build", *map(str, current), str(late), "--db", str(db), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"not in the ledger {db}, ingest first: {late} (run {shard_run_id(late)})\n"
    assert not (out / "main_table.csv").exists()


def test_validation_evaluations_never_enter_the_report(spread, tmp_path):
    """Evaluations of the val prompts (evaluation.split, for tuning) are in no table, claim or other setting, named
    as shards or found as the latest runs; a ledger from before splits (no column, then NULL) reports as before."""
    import duckdb

    from flowopd.results import tables
    from flowopd.results.claims import claims

    db, shards, out = spread
    build(shards, db, out)
    files = ("main_table.csv", "main_table.md", "main_table.tex", "claims.csv", "README.md")
    before = {name: (out / name).read_text() for name in files}
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE runs DROP COLUMN split")  # as a ledger written before the column existed
    con.close()
    build(shards, db, out)
    assert {name: (out / name).read_text() for name in files} == before
    later, root = "2026-01-01T00:00:00+00:00", tmp_path / "artifacts/val"  # newer than every test run
    val = [make_shard(root / "fo", "flow_opd", samples=scored({"text": -0.4}, seed=30), finished=later, split="val"),
           make_shard(root / "tuned", "flow_opd:tuned", samples=scored({"text": 0.4}, seed=31), finished=later,
                      split="val")]
    ingest(val, db)  # the column comes back: the older runs' NULL reads as test
    build([*shards, *val], db, out)
    after = {name: (out / name).read_text() for name in files}
    # the README gains only the validation table (its own section and index line: test_validation_table.py)
    section = (out / "validation.md").read_text().replace("# Validation", "## Validation", 1) + "\n"
    after["README.md"] = re.sub(r"^- \[validation\.md\].*\n", "", after["README.md"].replace(section, ""),
                                flags=re.MULTILINE)
    assert after == before
    assert "flow_opd:tuned" not in before["README.md"]
    assert tables.main_table(db).equals(tables.main_table(db, shards))  # the latest runs: the test ones
    assert claims(db).equals(claims(db, shards))


def test_spec_diff_lists_only_differing_leaves():
    a = {"mar": {"weight": 0.02, "anchor": "quality"}, "seeds": [0, 1, 2], "rules": [{"task": "t", "teacher": "x"}]}
    b = {"mar": {"weight": 0.0, "anchor": "quality"}, "seeds": [0, 1], "rules": [{"task": "t", "teacher": "y"}],
         "new": 1}
    assert flatten(a)["rules.0.teacher"] == "x" and flatten(a)["seeds"] == [0, 1, 2]
    assert [(p, o, n) for p, o, n in spec_diff(a, b) if p != "new"] == [
        ("mar.weight", 0.02, 0.0), ("seeds", [0, 1, 2], [0, 1]), ("rules.0.teacher", "x", "y")]
    assert [p for p, _, _ in spec_diff(a, b)] == ["mar.weight", "seeds", "rules.0.teacher", "new"]


@pytest.fixture
def two_specs(tmp_path):
    shutil.copy(SPECS / "flow_opd.yaml", tmp_path / "a.yaml")
    shutil.copy(SPECS / "schema.json", tmp_path / "schema.json")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: no_mar\nlabel: flow_opd:no_mar\nmar: {weight: 0.0}\n")
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


def test_compare_shows_differing_fields_and_metric_deltas(tmp_path, two_specs, capsys):
    a, b = two_specs
    hash_a, hash_b = spec_hash(load_spec(a)), spec_hash(load_spec(b))
    db, root = tmp_path / "ledger.duckdb", tmp_path / "eval"
    ingest([make_shard(root / "base", "base", tasks_with([0.2, 0.4], [0.5, 0.5], [2.0, 3.0]), spec_hash=hash_a),
            make_shard(root / "fo_old", "flow_opd", tasks_with([0.1, 0.1], [0.1, 0.1], [1.0, 1.0]), spec_hash=hash_a,
                       finished="2025-01-01T00:00:00+00:00"),
            make_shard(root / "fo", "flow_opd", tasks_with([0.8, 0.8], [0.7, 0.7], [4.0, 4.0]), spec_hash=hash_a)], db)
    assert main(["report", "compare", str(a), str(b), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    fields = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert fields == ['name: "flow_opd" -> "no_mar"', 'label: "flow_opd" -> "flow_opd:no_mar"', "mar.weight: 0.02 -> 0.0"]
    assert f"no results yet for B = {b}" in out

    ingest([make_shard(root / "nomar", "flow_opd:no_mar", tasks_with([0.6, 0.6], [0.6, 0.6], [3.0, 3.0]),
                       spec_hash=hash_b)], db)
    assert main(["report", "compare", str(a), str(b), "--db", str(db)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    deltas = {(r[0], r[2], r[3]): r[4:] for r in rows if len(r) == 11 and r[1] == "->"}
    # the latest flow_opd run; every prompt scores its seed's value, so the paired interval has no width
    assert deltas[("flow_opd", "flow_opd:no_mar", "text")] == ["0.8", "0.6", "-0.2", "-0.2", "-0.2", "paired", "yes"]
    avg = (0.6 + 0.6 + 0.6) / 3 - (0.8 + 0.7 + 0.8) / 3
    assert deltas[("flow_opd", "flow_opd:no_mar", "avg")][2:5] == [f"{avg:.6g}"] * 3
    assert ["base", "->", "-", "text", "0.3"] in rows  # only A has a base row


def test_compare_delta_interval_is_paired_and_says_whether_it_excludes_zero(tmp_path, two_specs):
    from flowopd.results.compare import compare_frame

    a, b = two_specs
    db, root = tmp_path / "ledger.duckdb", tmp_path / "eval"
    shift = {"text": 0.1, "objects": 0.1, "quality": 0.1}
    ingest([make_shard(root / "a", "flow_opd", samples=scored(shift, seed=1), spec_hash=spec_hash(load_spec(a))),
            make_shard(root / "b", "flow_opd:no_mar", samples=scored(shift | {"text": 0.13}, seed=2),
                       spec_hash=spec_hash(load_spec(b)))], db)
    frame = compare_frame(a, b, db)
    assert frame.columns == ["model_a", "model_b", "column", "a", "b", "delta", "lo", "hi", "pairing",
                             "excludes_zero"]
    rows = {r["column"]: r for r in frame.iter_rows(named=True)}
    assert set(rows) == {"text", "objects", "quality", "avg"} and {r["pairing"] for r in rows.values()} == {"paired"}
    assert rows["text"]["lo"] > 0 and rows["text"]["excludes_zero"]  # +0.03 over shared prompt difficulty
    assert rows["objects"]["lo"] < 0 < rows["objects"]["hi"] and not rows["objects"]["excludes_zero"]
    for r in rows.values():
        assert r["delta"] == pytest.approx(r["b"] - r["a"]) and r["lo"] < r["delta"] < r["hi"]


def test_compare_bad_spec_is_one_line(tmp_path, two_specs, capsys):
    a, _ = two_specs
    (tmp_path / "bad.yaml").write_text("extends: a.yaml\nmar: {weight: -1}\n")
    assert main(["report", "compare", str(a), str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert "mar.weight" in err and "Traceback" not in err
    assert main(["report", "compare", str(a), str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def test_render_bolds_a_best_only_where_values_differ_and_escapes_labels():
    import polars as pl

    from flowopd.results import formats as render

    frame = pl.DataFrame({"model": ["a_1", "b&c"], "x": [0.5, 0.5], "y": [0.1234, None], "y_lo": [0.1, None],
                          "y_hi": [0.2, None], "z": [0.30, 0.2996]})
    assert render.value_columns(frame) == ["x", "y", "z"]
    assert render.markdown(frame).splitlines()[2:] == ["| a_1 | 0.500 | 0.123 [0.100, 0.200] | 0.300 |",
                                                       "| b&c | 0.500 | – | 0.300 |"]  # ties at 3 digits
    assert render.markdown(frame, digits=4, best="min").splitlines()[3] == "| b&c | 0.5000 | – | **0.2996** |"
    latex = render.latex(frame, intervals=False)
    assert r"a\_1 & 0.500 & 0.123 & 0.300 \\" in latex and r"b\&c & 0.500 & -- & 0.300 \\" in latex
    assert render.render(frame, "csv", digits=2, intervals=False) == "model,x,y,z\na_1,0.50,0.12,0.30\nb&c,0.50,,0.30\n"

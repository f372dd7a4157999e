"""dvc.yaml from the spec files: one stage per (phase, resolved sub-spec), shared by every spec that agrees.

Two pipelines (PIPELINES): `dvc.yaml` runs specs/*.yaml, specs/ablations/*.yaml and specs/sweeps/*.yaml (the tiny
world, what `dvc repro` runs here; the sweeps evaluate on the validation prompts, where the main spec's values are
chosen); `sd3/dvc.yaml` runs specs/sd3/*.yaml (SD3.5 Medium on GPUs: `cd sd3 && dvc repro`) as a DVC project of its
own (so the root's `dvc status` and `dvc metrics show` never see its stages), writing under sd3/artifacts/ and
sd3/reports/ (its own ledger and report); its commands run from the repository root (`cd ..`), and its code, specs
and prompt files are dependencies outside its folder. Both follow the same rules:

A stage is named and keyed by the hash of the sections its phase reads (`flowopd.phases.keys.PHASE_SECTIONS`), so:
- editing evaluation settings changes only eval stages; editing the base changes the base and all downstream;
- two specs with the same base settings share one `base-<hash>` stage and artifact;
- a spec with `training_seeds: N` has N copies of every stage after the base (teachers, baseline, cold start, OPD
  and their evaluations), seed i > 0's named `<phase>-[<task>-]seed<i>-<key>` and run with `--training-seed i`;
  seed 0's are those of a one-seed spec (flowopd.phases.keys);
- each stage lists as DVC params only its own sections (OWN_SECTIONS): a section belongs to the first stage that
  reads it (seed, world and tasks to data; model and base to base; a teacher's settings to its teacher; evaluation
  to the eval stages), and reaches later stages through that stage's artifact, whose spec.json (hence DVC hash)
  changes with it. They are taken from every file of the `extends` chain of the spec the command runs (the first
  spec, in the pipeline's spec order, that has the stage). So dvc.lock does not repeat sections from stage to stage, an
  edited section reruns the stage that owns it (which refuses a stale key, flowopd.phases.keys.check_stage_key), and
  specs that only share a stage are not listed: adding one must not rerun it.
- dvc.lock keeps only the stages of dvc.yaml: `write` drops the entries of stages that no longer exist.
- a stage's code dependencies are its entry point and every flowopd module it can import (flowopd.pipeline.code_deps),
  so a code edit reruns only the stages that can run it.
- the data stage depends on the prompt files of `kind: file` tasks. Model and scorer folders (model.pretrained,
  pickscore.model) are not dependencies: they may be hub ids.
`flowopd pipeline write` regenerates both files; a test fails when a committed one is stale.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from flowopd.phases.keys import (
    PHASE_SECTIONS,
    baseline_sub_spec,
    cold_start_sub_spec,
    opd_sub_spec,
    stage_key,
    sub_spec_hash,
    teacher_sub_spec,
)
from flowopd.pipeline.code_deps import stage_code_deps
from flowopd.runtime.records import RUN_RECORD
from flowopd.spec import SpecError, extends_chain, load_spec


@dataclass(frozen=True)
class Layout:
    """One pipeline: its DVC project folder (holding dvc.yaml), the spec files it runs, where its artifacts and
    reports go (paths relative to the repository root)."""

    project: str
    specs: tuple[str, ...]
    artifacts: str
    reports: str

    @property
    def dvc_yaml(self) -> str:
        return os.path.normpath(f"{self.project}/dvc.yaml")

    def local(self, path: str) -> str:
        """A repository path as the project's dvc.yaml names it (relative to the project folder)."""
        return os.path.relpath(path, self.project)

    def localized(self, stage: dict) -> dict:
        """A stage written with repository paths, as its project's dvc.yaml holds it: the command run from the
        repository root, every dependency, output and params file relative to the project folder."""
        if self.project == ".":
            return stage

        def paths(entries):
            return [self.local(e) if isinstance(e, str) else {self.local(k): v for k, v in e.items()} for e in entries]

        to_root = shlex.quote(os.path.relpath(".", self.project))
        return {key: f"cd {to_root} && {value}" if key == "cmd" else paths(value) for key, value in stage.items()}


PIPELINES = (
    Layout(".", ("specs/*.yaml", "specs/ablations/*.yaml", "specs/sweeps/*.yaml"), "artifacts", "reports"),
    Layout("sd3", ("specs/sd3/*.yaml",), "sd3/artifacts", "sd3/reports"),
)
TINY = PIPELINES[0]
REPORT_OUTS = ["main_table.csv", "main_table.md", "main_table.tex", "claims.csv", "rescue.csv", "mar_table.md",
               "exploit_table.md", "README.md", "plots", "grids"]  # in the reports folder
VALIDATION_OUTS = ["validation.csv", "validation.md"]  # written only when a spec evaluates on `val` (sweeps)
# The sections each phase lists as DVC params; an sd3 base stage only names the pretrained model (its training stages
# read it themselves, not through the base artifact), so they list `model` too.
# `sampler` is the training phases' shared rollout sampler, which each inherits (so each lists it).
OWN_SECTIONS = {
    "data": ("seed", "world", "tasks"),
    "base": ("model", "base"),
    "teacher": ("sampler",),  # + teachers.<name>
    "baseline": ("sampler", "baseline"),
    "cold_start": ("router", "cold_start"),  # + sampler for sft
    "opd": ("sampler", "router", "opd", "mar"),
    "eval": ("evaluation",),
}
HEADER = (
    "# Generated from specs/ by `flowopd pipeline write` (make repro runs it). Do not edit by hand:\n"
    "# stages are keyed by the hash of the spec sections their phase reads, and shared across specs.\n"
)


def artifact_outs(folder: str) -> list:
    """An artifact folder (cached, what later stages depend on) and its run record beside it: an output without
    cache that no stage depends on, so a rerun's new times never make anything downstream stale. The record
    persists (DVC does not delete it before the stage runs): being in no cache, it would be lost by a failed or
    killed rerun; the stage replaces it atomically when it succeeds (flowopd.runtime.artifacts.atomic_folder)."""
    return [folder, {folder + RUN_RECORD: {"cache": False, "persist": True}}]


def command(*tokens: str) -> str:
    """A stage command: DVC runs it through a shell, so every token is quoted and a label with spaces or
    parentheses (`Flow-OPD (ours)`) stays one argument, never shell syntax. Plain tokens are written as they are."""
    return shlex.join(tokens)


SPEC_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.ya?ml$")  # what a spec file may be called


def pipeline_specs(root: Path, layout: Layout = TINY) -> list[str]:
    """Main specs first, then ablations, then sweeps, each sorted: the first spec of a shared stage names it in
    `cmd`."""
    return [p for pattern in layout.specs for p in sorted(glob.glob(pattern, root_dir=root))]


def prompt_files(spec) -> list[str]:
    """The prompt files of the spec's `kind: file` tasks (relative to the repository root), each once."""
    files = [path for task in spec.tasks.values() if task.prompts.kind == "file"
             for path in (task.prompts.train, task.prompts.test)]
    return sorted(set(files))


def spec_params(root: Path, spec_path: str, keys: tuple[str, ...]) -> list[dict]:
    """DVC params: for each file of the extends chain, the keys (`section` or `section.entry`) that file sets."""
    params = []
    for file, raw in extends_chain(root / spec_path, root):
        present = [k for k in keys if _sets(raw, k)]
        if present:
            params.append({os.path.relpath(file, root): present})
    return params


def _sets(raw: dict, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    return head in raw and (not rest or (isinstance(raw[head], dict) and rest in raw[head]))


class _Builder:
    """Collects stages across specs; a stage already added by an earlier spec is shared, not repeated."""

    def __init__(self, root: Path, layout: Layout):
        self.root, self.layout, self.stages = root, layout, {}
        self.used: set[str] = set()  # the stages of the spec being added
        self.shards: dict[str, str] = {}  # eval out -> the model folder it evaluated (the ledger reads its curve)
        self.anchor_task: str | None = None  # the MAR table's benchmark: the first spec's MAR anchor's task
        self.validates = False  # a spec evaluates on the validation prompts: the report writes VALIDATION_OUTS

    def add(self, name: str, stage: dict, spec_path: str, param_keys: tuple[str, ...]) -> None:
        self.used.add(name)
        if name not in self.stages:
            self.stages[name] = self.layout.localized({**stage, "params": spec_params(self.root, spec_path,
                                                                                      param_keys)})

    def code(self, phase: str) -> list[str]:
        """The stage's code dependencies: its entry point and every flowopd module it can import."""
        return stage_code_deps(phase, self.root)

    def artifact(self, phase: str, key: str) -> str:
        return f"{self.layout.artifacts}/{phase}/{key}"

    def train(self, phase: str, key: str, name: str, spec_path: str, args: list[str], param_keys,
              deps: list[str]) -> str:
        """A training stage writing <artifacts>/<phase>/<key> and its curve; returns the artifact folder."""
        out, curve = self.artifact(phase, key), f"{self.layout.reports}/curves/{phase}-{key}.csv"
        tokens = ["python", f"stages/{phase}.py", "--spec", spec_path, *args, "--out", out]
        tokens += ["--curve", curve] if phase != "cold_start" else []
        stage = {"cmd": command(*tokens), "deps": deps, "outs": artifact_outs(out)}
        if phase != "cold_start":
            stage["plots"] = [{curve: {"cache": False, "persist": True, "x": "step", "y": "loss" if phase == "base" else "reward"}}]
        self.add(name, stage, spec_path, param_keys)
        return out

    def evaluate(self, spec_path: str, model_key: str, label: str, model_dir: str, data_dir: str, eval_key: str):
        name, out = f"eval-{model_key}-{eval_key}", self.artifact("eval", f"{model_key}-{eval_key}")
        metrics = f"{self.layout.reports}/metrics/{name}.json"
        self.add(name, {
            "cmd": command("python", "stages/eval.py", "--spec", spec_path, "--model", model_dir, "--data", data_dir,
                           "--label", label, "--out", out, "--metrics", metrics),
            "deps": [*self.code("eval"), model_dir, data_dir],
            "outs": artifact_outs(out),
            "metrics": [{metrics: {"cache": False, "persist": True}}],
        }, spec_path, OWN_SECTIONS["eval"])
        self.shards[out] = model_dir

    def ledger_and_report(self) -> None:
        """The ledger ingests every eval shard (it keeps history across runs: persist, no DVC cache, rebuilt from
        the shards if lost); the report reads the current shards' rows. The report's outputs persist too: it
        replaces each one atomically when it succeeds, so a failed or killed report leaves the previous one."""
        if not self.shards:
            return
        db, reports, listed = f"{self.layout.reports}/ledger.duckdb", self.layout.reports, list(self.shards)
        quality = ["--quality-benchmark", self.anchor_task] if self.anchor_task else []
        self.stages["ledger"] = self.layout.localized({
            "cmd": command("python", "stages/ledger.py", "--db", db, *listed),
            "deps": [*self.code("ledger"), *self.shards, *sorted(set(self.shards.values()))],
            "outs": [{db: {"persist": True, "cache": False}}],
        })
        self.stages["report"] = self.layout.localized({
            "cmd": command("python", "stages/report.py", "--db", db, "--out", reports, *quality, *listed),
            "deps": [*self.code("report"), db, *self.shards],
            "outs": [{f"{reports}/{path}": {"cache": False, "persist": True}}
                     for path in REPORT_OUTS + VALIDATION_OUTS * self.validates],
        })


def build(root: Path = Path("."), layout: Layout = TINY, notes: list[str] | None = None) -> dict:
    """The dvc.yaml mapping of a pipeline (by default the tiny one) for its spec files under `root`. Refuses spec
    files with odd names and two specs with one name or label (SpecError naming both files); a spec that adds no
    stage of its own is appended to `notes` (its label would get no row of its own)."""
    root = Path(root)
    b = _Builder(root, layout)
    first_with, stages_of, problems = {}, {}, []  # (field, value) -> spec; frozenset of stages -> spec
    first_baseline: dict[str, str] = {}  # the spec whose baseline is the mixed_grpo row
    for spec_path in pipeline_specs(root, layout):
        if not SPEC_FILE_NAME.match(os.path.basename(spec_path)):
            problems.append(f"{spec_path}: a spec file name is letters, digits, _ . - and ends in .yaml")
            continue
        spec = load_spec(root / spec_path, root)
        for field, value in (("name", spec.name), ("label", spec.label)):
            first = first_with.setdefault((field, value), spec_path)
            if first != spec_path:
                problems.append(f"{spec_path}: {field} {value!r} is already the {field} of {first}; "
                                f"two specs must differ in both")
        b.used = set()
        if b.anchor_task is None and spec.mar.anchor in spec.teachers:
            b.anchor_task = spec.teachers[spec.mar.anchor].task
        keys = {phase: sub_spec_hash(spec, phase)[:10] for phase in PHASE_SECTIONS}
        data_dir = b.artifact("data", keys["data"])
        b.add(f"data-{keys['data']}", {
            "cmd": command("python", "stages/data.py", "--spec", spec_path, "--out", data_dir),
            "deps": [*b.code("data"), *prompt_files(spec)],
            "outs": artifact_outs(data_dir),
        }, spec_path, OWN_SECTIONS["data"])
        models = {}  # model key -> (report label, artifact folder)
        own_model = () if spec.model.kind == "tiny" else ("model",)
        base_dir, base_arg, base_deps = None, [], []
        if spec.model.kind == "tiny":
            base_dir = b.train("base", keys["base"], f"base-{keys['base']}", spec_path, [],
                               OWN_SECTIONS["base"], b.code("base"))
            base_arg, base_deps = ["--base", base_dir], [base_dir]
        else:  # the pretrained model as an artifact without an adapter: the first row, and OPD's start for `none`
            base_dir = b.artifact("base", keys["base"])
            b.add(f"base-{keys['base']}", {
                "cmd": command("python", "stages/base.py", "--spec", spec_path, "--out", base_dir),
                "deps": b.code("base"),
                "outs": artifact_outs(base_dir),
            }, spec_path, own_model)
        models[f"base-{keys['base']}"] = ("base", base_dir)
        inputs = [*base_arg, "--data", data_dir]
        for seed in range(spec.training_seeds):  # data and base are shared; seed 0's stages are a one-seed spec's
            seed_arg = ["--training-seed", str(seed)] if seed else []
            tag = f"seed{seed}-" if seed else ""  # names the seed in stage names (the key already depends on it)
            teacher_dirs = {}
            for name, teacher in spec.teachers.items():
                key = stage_key(teacher_sub_spec(spec, name, seed))
                params = (*own_model, *OWN_SECTIONS["teacher"], f"teachers.{name}")
                teacher_dirs[name] = b.train("teacher", key, f"teacher-{teacher.task}-{tag}{key}", spec_path,
                                             ["--teacher", name, *seed_arg, *inputs], params,
                                             [*b.code("teacher"), *base_deps, data_dir])
                models[f"teacher-{tag}{key}"] = (f"teacher:{name}", teacher_dirs[name])
            if spec.baseline is not None:
                key = stage_key(baseline_sub_spec(spec, seed))
                out = b.train("baseline", key, f"baseline-{tag}{key}", spec_path, [*seed_arg, *inputs],
                              (*own_model, *OWN_SECTIONS["baseline"]), [*b.code("baseline"), *base_deps, data_dir])
                models[f"baseline-{tag}{key}"] = ("mixed_grpo", out)
            if teacher_dirs:
                teacher_args = [arg for name, folder in teacher_dirs.items()
                                for arg in ("--teacher", f"{name}={folder}")]
                teacher_deps = sorted(set(teacher_dirs.values()))
                init_dir = base_dir
                if spec.cold_start.method != "none":
                    key = stage_key(cold_start_sub_spec(spec, seed))
                    sft = ("sampler",) if spec.cold_start.method == "sft" else ()
                    init_dir = b.train("cold_start", key, f"cold_start-{tag}{key}", spec_path,
                                       [*seed_arg, *inputs, *teacher_args],
                                       (*own_model, *sft, *OWN_SECTIONS["cold_start"]),
                                       [*b.code("cold_start"), *base_deps, data_dir, *teacher_deps])
                key = stage_key(opd_sub_spec(spec, seed))
                out = b.train("opd", key, f"opd-{tag}{key}", spec_path,
                              [*seed_arg, *inputs, *teacher_args, "--init", init_dir],
                              (*own_model, *OWN_SECTIONS["opd"]),
                              [*b.code("opd"), *base_deps, data_dir, *teacher_deps, init_dir])
                models[f"opd-{tag}{key}"] = (spec.label, out)
        # A mixed baseline of a later spec's own, beside the shared one and with no student of its own (a
        # budget-matched mix), is that spec's row, under its label; otherwise the row is `mixed_grpo`.
        new_rows = [model_key.split("-")[0] for model_key in models if f"eval-{model_key}-{keys['eval']}" not in b.stages]
        if spec.baseline is not None and first_baseline.setdefault("spec", spec_path) != spec_path \
                and "baseline" in new_rows and "opd" not in new_rows:
            models = {model_key: (spec.label if model_key.startswith("baseline-") else label, folder)
                      for model_key, (label, folder) in models.items()}
        b.validates |= spec.evaluation.split == "val"
        for model_key, (label, model_dir) in models.items():
            b.evaluate(spec_path, model_key, label, model_dir, data_dir, keys["eval"])
        twin = stages_of.setdefault(frozenset(b.used), spec_path)
        if twin != spec_path and notes is not None:
            notes.append(f"{spec_path} runs the same stages as {twin} (twins): its label {spec.label!r} gets no "
                         "row of its own; change what it ablates or remove it")
    if problems:
        raise SpecError(problems)
    b.ledger_and_report()
    return {"stages": b.stages}


def render(root: Path = Path("."), layout: Layout = TINY, notes: list[str] | None = None) -> str:
    return HEADER + yaml.safe_dump(build(root, layout, notes), sort_keys=False, width=120)


def layouts(root: Path) -> list[Layout]:
    """The pipelines that have spec files under `root`."""
    return [layout for layout in PIPELINES if pipeline_specs(Path(root), layout)]


def write(root: Path = Path("."), notes: list[str] | None = None) -> list[str]:
    """Write each pipeline's dvc.yaml and drop its dvc.lock's entries of stages it no longer has; returns the
    dvc.yaml files that changed (twin specs are appended to `notes`)."""
    changed = []
    for layout in layouts(root):
        path, text = Path(root) / layout.dvc_yaml, render(root, layout, notes)
        prune_lock(path.with_name("dvc.lock"), set(yaml.safe_load(text)["stages"]))
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(layout.dvc_yaml)
        init_project(Path(root) / layout.project)
    return changed


def init_project(folder: Path) -> None:
    """Make a pipeline's own folder a DVC project (`dvc init --subdir`, analytics off) unless it is one already;
    the repository root is left to `dvc init` (make repro's set-up)."""
    if (folder / ".dvc").is_dir() or not (folder.parent / ".dvc").is_dir():
        return
    for command in (("init", "--subdir", "-q"), ("config", "core.analytics", "false")):
        subprocess.run([sys.executable, "-m", "dvc", *command], cwd=folder, check=True, capture_output=True)


def prune_lock(lock: Path, live: set[str]) -> list[str]:
    """Drop the dvc.lock entries of stages not in `live` (DVC keeps a removed stage's entry, and parses and rewrites
    the whole file after every stage it runs). Returns the dropped names. The entries kept stay byte for byte: a
    dead entry's lines (its `  name:` line and the deeper-indented ones after it) are cut from DVC's layout."""
    if not lock.is_file():
        return []
    text = lock.read_text()
    stages = (yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}).get("stages") or {}
    dead = [name for name in stages if name not in live]
    if not dead:
        return []
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        entry = re.match(r"  (\S[^:]*):", line)
        if entry:
            skipping = entry.group(1).strip("'\"") in dead
        elif not line.startswith("   "):  # `stages:`, `schema:`: top level again
            skipping = False
        if not skipping:
            kept.append(line)
    pruned = "".join(kept)
    if set(yaml.safe_load(pruned).get("stages") or {}) != set(stages) - set(dead):
        print(f"note: {lock} has an unexpected layout; its entries of removed stages are left in place")
        return []
    lock.write_text(pruned)
    return dead


def stale(root: Path = Path(".")) -> bool:
    """Whether a committed dvc.yaml differs from what its specs give."""
    for layout in layouts(root):
        path = Path(root) / layout.dvc_yaml
        if not path.exists() or path.read_text() != render(root, layout):
            return True
    return False

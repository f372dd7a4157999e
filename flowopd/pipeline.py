"""dvc.yaml from the spec files: one stage per (phase, resolved sub-spec), shared by every spec that agrees.

A stage is named and keyed by the hash of the sections its phase reads (`flowopd.phases.PHASE_SECTIONS`), so:
- editing evaluation settings changes only eval stages; editing the base changes the base and all downstream;
- two specs with the same base settings share one `base-<hash>` stage and artifact;
- each stage lists as DVC params the keys of its sections in every file of the `extends` chain of the spec its
  command runs (the first spec, in PIPELINE_SPECS order, that has these sections), so
  `dvc exp run -S specs/flow_opd.yaml:base.steps=10` reruns what it should. Specs that only share a stage are not
  listed: adding one must not rerun the stage.
`flowopd pipeline write` regenerates dvc.yaml; a test fails when the committed one is stale.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import yaml

from flowopd.phases import PHASE_SECTIONS, sub_spec_hash
from flowopd.spec import extends_chain, load_spec

PIPELINE_SPECS = ("specs/*.yaml", "specs/ablations/*.yaml")  # specs/sd3/ are for GPU clusters, not dvc repro here
CODE_DEPS = {
    "data": ["stages/data.py", "flowopd/phases.py", "flowopd/data.py", "flowopd/world"],
    "base": ["stages/base.py", "flowopd/phases.py", "flowopd/pretrain.py", "flowopd/models", "flowopd/world"],
    "eval": ["stages/eval.py", "flowopd/phases.py", "flowopd/evaluate.py", "flowopd/sampling.py", "flowopd/sde.py", "flowopd/rewards",
             "flowopd/models"],
}
LEDGER_DEPS = ["stages/ledger.py", "flowopd/ledger.py", "flowopd/artifacts.py"]
REPORT_DEPS = ["stages/report.py", "flowopd/report.py", "flowopd/ledger.py"]
REPORT_OUTS = ["reports/main_table.csv", "reports/main_table.md", "reports/README.md", "reports/plots",
               "reports/grids"]
HEADER = (
    "# Generated from specs/ by `flowopd pipeline write` (make repro runs it). Do not edit by hand:\n"
    "# stages are keyed by the hash of the spec sections their phase reads, and shared across specs.\n"
)


def pipeline_specs(root: Path) -> list[str]:
    """Main specs first, then ablations, each sorted: the first spec of a shared stage names it in `cmd`."""
    return [p for pattern in PIPELINE_SPECS for p in sorted(glob.glob(pattern, root_dir=root))]


def spec_params(root: Path, spec_path: str, sections: tuple[str, ...]) -> list[dict]:
    """DVC params: for each file of the extends chain, the phase's top-level keys that file sets."""
    params = []
    for file, raw in extends_chain(root / spec_path):
        keys = [s for s in sections if s in raw]
        if keys:
            params.append({os.path.relpath(file, root): keys})
    return params


def build(root: Path = Path(".")) -> dict:
    """The dvc.yaml mapping for every pipeline spec under `root`."""
    root = Path(root)
    stages: dict[str, dict] = {}
    shards: dict[str, str] = {}  # eval out -> the model folder it evaluated (the ledger reads its curve)

    def add(name: str, stage: dict, params: list[dict]) -> None:
        stages.setdefault(name, {**stage, "params": params})  # a later spec with the same sections shares it

    for spec_path in pipeline_specs(root):
        spec = load_spec(root / spec_path)
        keys = {phase: sub_spec_hash(spec, phase)[:10] for phase in PHASE_SECTIONS}
        params = {phase: spec_params(root, spec_path, sections) for phase, sections in PHASE_SECTIONS.items()}
        data_dir = f"artifacts/data/{keys['data']}"
        add(f"data-{keys['data']}", {
            "cmd": f"python stages/data.py --spec {spec_path} --out {data_dir}",
            "deps": CODE_DEPS["data"],
            "outs": [data_dir],
        }, params["data"])
        models = {}
        if spec.model.kind == "tiny":
            base_dir = f"artifacts/base/{keys['base']}"
            add(f"base-{keys['base']}", {
                "cmd": f"python stages/base.py --spec {spec_path} --out {base_dir} "
                       f"--curve reports/curves/base-{keys['base']}.csv",
                "deps": CODE_DEPS["base"],
                "outs": [base_dir],
                "plots": [{f"reports/curves/base-{keys['base']}.csv": {"cache": False, "x": "step", "y": "loss"}}],
            }, params["base"])
            models[f"base-{keys['base']}"] = ("base", base_dir)
        for model_key, (label, model_dir) in models.items():
            name = f"eval-{model_key}-{keys['eval']}"
            out = f"artifacts/eval/{model_key}-{keys['eval']}"
            add(name, {
                "cmd": f"python stages/eval.py --spec {spec_path} --model {model_dir} --data {data_dir} "
                       f"--label {label} --out {out} --metrics reports/metrics/{name}.json",
                "deps": [*CODE_DEPS["eval"], model_dir, data_dir],
                "outs": [out],
                "metrics": [{f"reports/metrics/{name}.json": {"cache": False}}],
            }, params["eval"])
            shards[out] = model_dir
    if shards:
        listed = " ".join(shards)
        # The ledger keeps history across runs (persist), and is rebuilt from shards if lost (no DVC cache).
        stages["ledger"] = {
            "cmd": f"python stages/ledger.py --db reports/ledger.duckdb {listed}",
            "deps": [*LEDGER_DEPS, *shards, *sorted(set(shards.values()))],
            "outs": [{"reports/ledger.duckdb": {"persist": True, "cache": False}}],
        }
        stages["report"] = {
            "cmd": f"python stages/report.py --db reports/ledger.duckdb --out reports {listed}",
            "deps": [*REPORT_DEPS, "reports/ledger.duckdb", *shards],
            "outs": [{path: {"cache": False}} for path in REPORT_OUTS],
        }
    return {"stages": stages}


def render(root: Path = Path(".")) -> str:
    return HEADER + yaml.safe_dump(build(root), sort_keys=False, width=120)


def write(root: Path = Path(".")) -> bool:
    """Write dvc.yaml; returns whether it changed."""
    path, text = Path(root) / "dvc.yaml", render(root)
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def stale(root: Path = Path(".")) -> bool:
    path = Path(root) / "dvc.yaml"
    return not path.exists() or path.read_text() != render(root)

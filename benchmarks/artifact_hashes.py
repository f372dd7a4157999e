"""Do two checkouts write the same artifacts? sha256 of every file every stage of a set of micro specs writes.

For each checkout (a folder holding `flowopd/` and `stages/`, e.g. `git archive <rev> | tar -x -C DIR`), a scratch
DVC repository gets that checkout's code and the micro specs below (every phase and every code path of the tiny
world: GRPO, NFT and LoRA teachers, the mixed baseline, merge (linear, task arithmetic, TIES), SFT (best of group)
and no cold start, OPD with each estimator, element and step credit, reward-to-go, with and without MAR, anchored on
a teacher or the base, and the evaluations), then runs its own `flowopd pipeline write` and `dvc repro`. It prints
one line per artifact file with its sha256 per checkout, and a summary; it exits 1 when any file differs or is
missing from one checkout. Run records, checkpoints and reports/ (times, git revisions) are left out.

    .venv/bin/python benchmarks/artifact_hashes.py OLD_DIR NEW_DIR [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARENT = "specs/parent/flow_opd.yaml"  # outside the pipeline's globs, so only the micro specs run
MICRO = (ROOT / "tests/data/micro.yaml").read_text().replace("../../specs/flow_opd.yaml", "parent/flow_opd.yaml")
NFT = "{kind: nft, steps: 2, prompts_per_step: 1, group_size: 2, sampler: {noise_level: 0.0}}"
# name -> the lines a variant adds to the micro spec (each extends specs/micro.yaml)
VARIANTS = {
    "nft": f"teachers:\n  text: {{method: {NFT}}}\n  objects: {{method: {NFT}}}\n  quality: {{method: {NFT}}}\n"
           f"baseline: {{method: {NFT}, advantage: per_reward}}",
    "lora": "teachers:\n  text: {method: {kind: grpo, lora: {rank: 4, alpha: 8.0}}}",
    "task_arithmetic": "cold_start: {method: merge, mode: task_arithmetic, scale: 0.5}",
    "ties": "cold_start: {method: merge, mode: ties, ties_density: 0.5}",
    "sft": "cold_start: {method: sft, steps: 2, batch_size: 4, samples_per_prompt: 2, best_of_group: true}",
    "none": "cold_start: {method: none}",
    "step_credit": "opd: {credit: step, reward_to_go: true, normalize_advantage: true}",
    "analytic": "opd: {estimator: analytic, credit: step}",
    "analytic_grad": "opd: {estimator: analytic_grad}",
    "diffusion_opd": "opd: {estimator: diffusion_opd, sampler: {noise_level: 0.0}}",
    "velocity_mse": "opd: {estimator: velocity_mse, sampler: {noise_level: 0.0}, query: {steps: [0, 1], draw: beta}}",
    "no_mar": "mar: {weight: 0.0}",
    "anchor_base": "mar: {anchor: base}",
}
LEFT_OUT = (".run.json", ".ckpt")


def specs() -> dict[str, str]:
    """Spec path (under the scratch repository) -> YAML text."""
    out = {PARENT: (ROOT / "specs/flow_opd.yaml").read_text(), "specs/micro.yaml": MICRO}
    for name, lines in VARIANTS.items():
        out[f"specs/ablations/{name}.yaml"] = (f"extends: ../micro.yaml\nname: micro_{name}\nlabel: micro:{name}\n"
                                               f"{lines}\n")
    return out


def run(cwd: Path, env: dict, *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


def build(checkout: Path, tree: Path) -> dict[str, str]:
    """Run the micro pipeline with `checkout`'s code in `tree`; -> {artifact file: sha256}."""
    for folder in ("flowopd", "stages"):
        shutil.copytree(checkout / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in specs().items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    (tree / ".gitignore").write_text("/artifacts/\nledger.duckdb*\n__pycache__/\n")
    # the checkout's own package first on the path, the running interpreter's folder first on PATH (stages: `python`)
    env = {**os.environ, "PYTHONPATH": str(tree), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@localhost")
    for command in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "config", "core.analytics", "false"),
                    (*git, "add", "-A"), (*git, "commit", "-qm", "scratch"),
                    (sys.executable, "-m", "flowopd", "pipeline", "write")):
        run(tree, env, *command)
    start = time.time()
    run(tree, env, "dvc", "repro")
    print(f"{checkout}: dvc repro {time.time() - start:.0f} s", file=sys.stderr)
    hashes = {}
    for path in sorted((tree / "artifacts").rglob("*")):
        relative = path.relative_to(tree).as_posix()
        if path.is_file() and not any(part.endswith(LEFT_OUT) for part in path.relative_to(tree).parts):
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="folders with flowopd/ and stages/")
    parser.add_argument("--keep", type=Path, help="build the scratch repositories here and keep them")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="artifact-hashes-")) if args.keep is None else args.keep
    try:
        results = [build(c.resolve(), scratch / f"{i}") for i, c in enumerate(args.checkouts)]
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    paths = sorted(set().union(*results))
    differ = 0
    for path in paths:
        hashes = [r.get(path, "-" * 16) for r in results]
        same = len(set(hashes)) == 1
        differ += not same
        print(f"{'same ' if same else 'DIFF '} {'  '.join(h[:16] for h in hashes)}  {path}")
    weights = [p for p in paths if p.endswith(".safetensors")]
    same_weights = sum(len({r.get(p) for r in results}) == 1 for p in weights)
    print(f"{len(paths)} artifact files, {len(paths) - differ} identical in every checkout; weight files "
          f"{same_weights} of {len(weights)} identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""Data phase: the prompt sets of every task (train for RL, test for benchmarks) as JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path

from flowopd.world import Prompt, WorldConfig, make_prompt_set

SPLITS = ("train", "test")


def world_config(spec) -> WorldConfig:
    return WorldConfig(**spec.world.model_dump(mode="json"))


def build_prompt_sets(spec) -> dict[str, dict[str, list[Prompt]]]:
    """Deterministic prompt sets from the spec's seed; file-based sets (SD3 scale) are not built here."""
    world = world_config(spec)
    sets: dict[str, dict[str, list[Prompt]]] = {}
    for name, task in spec.tasks.items():
        source = task.prompts
        if source.kind != "tiny":
            raise NotImplementedError(f"tasks.{name}.prompts: kind {source.kind!r} is read at train time, not built")
        sizes = {"train": source.n_train, "test": source.n_test}
        sets[name] = {
            split: make_prompt_set(world, source.task, sizes[split], spec.seed, split) for split in SPLITS
        }
    return sets


def write_prompt_sets(sets: dict[str, dict[str, list[Prompt]]], folder: Path) -> None:
    for task, splits in sets.items():
        for split, prompts in splits.items():
            lines = "".join(json.dumps(p.to_dict(), sort_keys=True) + "\n" for p in prompts)
            (Path(folder) / f"{task}.{split}.jsonl").write_text(lines)


def read_prompts(folder: Path, task: str, split: str) -> list[Prompt]:
    path = Path(folder) / f"{task}.{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"prompt set {path} is missing: run the data phase first")
    return [Prompt.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

"""Prompt sets: every task's train (for RL), validation (for tuning) and test (for the report) prompts as JSON Lines
(the data phase). Tiny held-out sets are distinct prompts of content no other split of any task shows
(flowopd.world.grammar); the data phase refuses a world too small to fill them.

Two sources, one output: the tiny world's grammar (drawn from the spec's seed), or prompt files in Flow-GRPO's
formats (its `dataset/<task>/` folders), read once here so every later phase reads the same JSON Lines:
- `lines`: one prompt per line (Flow-GRPO's ocr / pickscore / drawbench `train.txt`, `test.txt`); surrounding
  whitespace stripped, blank lines skipped.
- `geneval_jsonl`: one JSON object per line with at least "prompt" (Flow-GRPO's geneval `*_metadata.jsonl`); the
  other keys ("tag", "include", "exclude", ...) are kept as the prompt's `metadata`, which the GenEval scorer needs.
A file prompt is a `FilePrompt`, the tiny world's `Prompt` plus `metadata`, so trainers, router and rewards use it
alike: `text`, `task` = the spec's task name (its dataset of origin, what the router's task rules match), `kind` =
GenEval's tag when there is one, else the task name; no `word` or `objects` (the tiny world's structure).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flowopd.spec.choices import PROMPT_FILE_FORMATS
from flowopd.spec.paths import PROMPT_FILE_MAX_BYTES, PathRefused, allowed_roots, read_confined
from flowopd.world import SPLITS, Prompt, WorldConfig, content_key, distinct_contents, make_prompt_set


@dataclass(frozen=True)
class FilePrompt(Prompt):
    """A prompt read from a file; `metadata`: the file's other fields (GenEval: tag, include, exclude), which
    remote scorers receive. Hashable like Prompt (metadata, a dict, is left out of the hash)."""

    metadata: dict = field(default_factory=dict, hash=False)

    @staticmethod
    def from_dict(d: dict) -> FilePrompt:
        return FilePrompt(**{**d, "objects": ()})


def prompt_from_dict(d: dict) -> Prompt:
    """A line of a prompt set: FilePrompt when it carries metadata (file sets), else the tiny world's Prompt."""
    return FilePrompt.from_dict(d) if "metadata" in d else Prompt.from_dict(d)


def world_config(spec) -> WorldConfig:
    return WorldConfig(**spec.world.model_dump(mode="json"))


def read_prompt_file(path: str | Path, format: str, task: str, roots: list[Path] | None = None) -> list[FilePrompt]:
    """Prompts of one file in Flow-GRPO's formats (see the module docstring); errors name the file and line. The
    file is read only if regular, under PROMPT_FILE_MAX_BYTES and (when `roots` are given) inside them."""
    if format not in PROMPT_FILE_FORMATS:
        raise ValueError(f"unknown prompt file format {format!r}; expected one of {', '.join(PROMPT_FILE_FORMATS)}")
    path = Path(path)
    try:
        text = read_confined(path, PROMPT_FILE_MAX_BYTES, roots).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path} not found (task {task!r}; Flow-GRPO's dataset/ folder has "
                                f"the published sets)") from None
    except PathRefused as err:
        raise ValueError(f"prompt file {path} (task {task!r}) refused: {err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path} (task {task!r}) is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if format == "lines":
            prompts.append(FilePrompt(text=line, task=task, kind=task))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object: {err.msg}") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{number}: needs a non-empty string \"prompt\"")
        metadata = {k: v for k, v in record.items() if k != "prompt"}
        prompts.append(FilePrompt(text=prompt.strip(), task=task, kind=str(metadata.get("tag", task)),
                                  metadata=metadata))
    if not prompts:
        raise ValueError(f"{path}: no prompts (task {task!r})")
    return prompts


def build_prompt_sets(spec, root: str | Path | None = None) -> dict[str, dict[str, list[Prompt]]]:
    """Every task's train and test prompts: tiny sets drawn from the spec's seed, file sets read from `root`
    (default: the working directory, i.e. the repository root where stages run) joined with the spec's paths."""
    world = world_config(spec)
    root = Path.cwd() if root is None else Path(root)
    roots = allowed_roots(root)  # a symbolic link inside the repository may not lead out of it
    sets: dict[str, dict[str, list[Prompt]]] = {}
    for name, task in spec.tasks.items():
        source = task.prompts
        if source.kind == "file":
            files = {"train": source.train, "val": source.val, "test": source.test}
            sets[name] = {split: read_prompt_file(root / files[split], source.format, name, roots)
                          for split in SPLITS if files[split] is not None}
            continue
        sizes = {"train": source.n_train, "val": source.n_val, "test": source.n_test}
        for split in ("val", "test"):
            check_held_out_size(world, name, source.task, split, sizes[split])
        sets[name] = {
            split: make_prompt_set(world, source.task, sizes[split], spec.seed, split) for split in SPLITS
        }
    return sets


def content_census(spec, sets: dict[str, dict[str, list[Prompt]]]) -> dict[str, dict[str, int]]:
    """Distinct contents per tiny task and split, after checking that no validation or test content appears in any
    other split of any task (the grammar's partition guarantees it; this is what the data phase records)."""
    tiny = [name for name, task in spec.tasks.items() if task.prompts.kind == "tiny"]
    contents = {(name, split): {content_key(p) for p in sets[name][split]} for name in tiny for split in SPLITS}
    for (name, split), keys in contents.items():
        if split == "train":
            continue
        for (other, other_split), other_keys in contents.items():
            shared = keys & other_keys if (other, other_split) != (name, split) else set()
            if shared:
                raise ValueError(f"{len(shared)} {split} contents of task {name!r} also appear in the {other_split} "
                                 f"split of task {other!r}, e.g. {min(shared, key=repr)}")
    return {name: {split: len(contents[name, split]) for split in SPLITS} for name in tiny}


def check_held_out_size(world: WorldConfig, name: str, task: str, split: str, wanted: int) -> None:
    """A held-out set never repeats a prompt: refuse a world whose split has fewer distinct contents than asked."""
    available = distinct_contents(world, task, split)
    if wanted > available:
        raise ValueError(
            f"task {name!r}: the world holds {available} distinct {split} contents, the spec asks for {wanted} "
            f"(tasks.{name}.prompts.n_{split}); grow the world (alphabet, word_length, colours, max_count, "
            f"quality_families) or ask for fewer")


def write_prompt_sets(sets: dict[str, dict[str, list[Prompt]]], folder: Path) -> None:
    for task, splits in sets.items():
        for split, prompts in splits.items():
            lines = "".join(json.dumps(p.to_dict(), sort_keys=True) + "\n" for p in prompts)
            (Path(folder) / f"{task}.{split}.jsonl").write_text(lines)


def read_prompts(folder: Path, task: str, split: str) -> list[Prompt]:
    path = Path(folder) / f"{task}.{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"prompt set {path} is missing: run the data phase first")
    return [prompt_from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def training_prompts(spec, data_dir) -> tuple[list, list[str]]:
    """The union of the spec's tasks' train prompts, in task order, and each prompt's task of origin."""
    prompts, tasks = [], []
    for task in spec.tasks:
        task_prompts = read_prompts(data_dir, task, "train")
        prompts += task_prompts
        tasks += [task] * len(task_prompts)
    return prompts, tasks

"""The tiny world's prompt grammar: words on signs, GenEval-style object scenes, quality prompts.

Every prompt carries its task tag and the structured fields the renderer and the rewards read, so no reward ever
parses prompt text. Prompt sets are drawn deterministically from a seed; the train / test split is a fixed partition
of the grammar (independent of the seed), so any train set and any test set are disjoint.
"""

import functools
import itertools
from dataclasses import asdict, dataclass

import numpy as np

from flowopd.spec.choices import TASK_FAMILIES

TASKS = TASK_FAMILIES
# Saturated RGB colours the renderer paints with and the object checker segments against.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
OBJECT_KINDS = ("single", "counting", "pair", "relation")  # GenEval categories that fit a 32x32 canvas
QUALITY_TEMPLATES = (
    "a clean, sharp render of a {}",
    "a crisp picture of a {} on white",
    "a tidy, noise-free image of a {}",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
TEST_FRACTION = 0.25  # share of each prompt family held out for the test split
SPLIT_SEED = 20240601  # fixes the train / test partition once for all seeds


@dataclass(frozen=True)
class WorldConfig:
    canvas: int = 32
    alphabet: str = "ACEHKOTX"
    word_length: int = 2
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    max_count: int = 3
    relations: tuple[str, ...] = ("left of", "right of", "above", "below")
    jitter: bool = True  # False: one canonical render per prompt (fixed sizes, centred layouts)

    def __post_init__(self):
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "relations", tuple(self.relations))
        unknown = [c for c in self.colours if c not in PALETTE] + [s for s in self.shapes if s not in SHAPES]
        unknown += [r for r in self.relations if r not in ("left of", "right of", "above", "below")]
        if unknown:
            raise ValueError(f"unknown colours / shapes / relations: {unknown}")
        if not (1 <= self.max_count < len(NUMBER_WORDS)) or len(self.alphabet) < 2 or self.word_length < 1:
            raise ValueError("need 1 <= max_count <= 5, an alphabet of >= 2 letters, word_length >= 1")


@dataclass(frozen=True)
class ObjectGroup:
    colour: str
    shape: str
    count: int = 1

    def phrase(self) -> str:
        if self.count == 1:
            return f"a {self.colour} {self.shape}"
        return f"{NUMBER_WORDS[self.count]} {self.colour} {self.shape}s"


@dataclass(frozen=True)
class Prompt:
    text: str  # what the model is conditioned on
    task: str  # "text" | "objects" | "quality"
    word: str = ""  # text task: the word on the sign
    objects: tuple[ObjectGroup, ...] = ()  # objects / quality tasks
    relation: str = ""  # objects[0] <relation> objects[1], when set
    kind: str = ""  # objects: single | counting | pair | relation; others: the task name

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Prompt":
        groups = tuple(ObjectGroup(**g) for g in d.get("objects", ()))
        return Prompt(**{**d, "objects": groups})


# ---------------------------------------------------------------- constructors: the grammar's sentences
def text_prompt(word: str) -> Prompt:
    return Prompt(text=f'a sign that says "{word}"', task="text", word=word, kind="text")


def objects_prompt(groups: tuple[ObjectGroup, ...], relation: str = "") -> Prompt:
    groups = tuple(groups)
    if relation:
        text, kind = f"a photo of {groups[0].phrase()} {relation} {groups[1].phrase()}", "relation"
    elif len(groups) == 2:
        text, kind = f"a photo of {groups[0].phrase()} and {groups[1].phrase()}", "pair"
    else:
        text, kind = f"a photo of {groups[0].phrase()}", "single" if groups[0].count == 1 else "counting"
    return Prompt(text=text, task="objects", objects=groups, relation=relation, kind=kind)


def quality_prompt(colour: str, shape: str, template: int = 0) -> Prompt:
    text = QUALITY_TEMPLATES[template].format(f"{colour} {shape}")
    return Prompt(text=text, task="quality", objects=(ObjectGroup(colour, shape, 1),), kind="quality")


# ---------------------------------------------------------------- enumeration of the whole grammar
@functools.lru_cache(maxsize=64)
def all_prompts(world: WorldConfig, task: str) -> dict[str, tuple[Prompt, ...]]:
    """Every prompt of a task, grouped by family (kind), in a canonical order."""
    items = [ObjectGroup(c, s) for c in world.colours for s in world.shapes]
    if task == "text":
        words = ["".join(p) for p in itertools.product(world.alphabet, repeat=world.word_length)]
        return {"text": tuple(text_prompt(w) for w in words)}
    if task == "quality":
        templates = range(len(QUALITY_TEMPLATES))
        return {"quality": tuple(quality_prompt(g.colour, g.shape, t) for t in templates for g in items)}
    if task != "objects":
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    families = {
        "single": [objects_prompt((g,)) for g in items],
        "counting": [objects_prompt((ObjectGroup(g.colour, g.shape, n),)) for n in range(2, world.max_count + 1)
                     for g in items],
        "pair": [objects_prompt((a, b)) for a, b in itertools.combinations(items, 2)],
        "relation": [objects_prompt((a, b), r) for r in world.relations for a in items for b in items if a != b],
    }
    return {k: tuple(v) for k, v in families.items() if v}


def split_prompts(world: WorldConfig, task: str, split: str) -> dict[str, list[Prompt]]:
    """The fixed partition: per family, a seeded permutation; the first TEST_FRACTION is the test split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out = {}
    for kind, prompts in all_prompts(world, task).items():
        order = np.random.default_rng(SPLIT_SEED).permutation(len(prompts))
        n_test = max(1, round(TEST_FRACTION * len(prompts)))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        if len(chosen):
            out[kind] = [prompts[i] for i in sorted(chosen)]
    return out


def make_prompt_set(world: WorldConfig, task: str, n: int, seed: int, split: str) -> list[Prompt]:
    """n prompts of one task, balanced over its families; cycles through each family's shuffled pool."""
    rng = np.random.default_rng(seed)
    families = split_prompts(world, task, split)
    kinds = list(families)
    pools = {k: [] for k in kinds}
    picked = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if not pools[kind]:
            pools[kind] = [families[kind][j] for j in rng.permutation(len(families[kind]))]
        picked.append(pools[kind].pop())
    return [picked[j] for j in rng.permutation(n)]


def sample_prompts(world: WorldConfig, rng: np.random.Generator, n: int) -> list[Prompt]:
    """n prompts from the whole grammar (both splits): task uniform, family uniform, then prompt uniform."""
    grammar = {task: all_prompts(world, task) for task in TASKS}
    out = []
    for _ in range(n):
        families = grammar[TASKS[rng.integers(len(TASKS))]]
        family = list(families.values())[rng.integers(len(families))]
        out.append(family[rng.integers(len(family))])
    return out



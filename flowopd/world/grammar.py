"""The tiny world's prompt grammar: words on signs, GenEval-style object scenes, quality prompts.

Every prompt carries its task tag and the structured fields the renderer and the rewards read, so no reward ever
parses prompt text. Prompt sets are drawn deterministically from a seed.

Splits partition *content*, not wording: a prompt's content is what its image must show (`content_key`: the word on
a sign, or the scene, with "b right of a" read as "a left of b" and "a and b", drawn as "a left of b", read so), and
the quality task's "a clean render of ..." asks for the same scenes as the objects task's "a photo of ...". The
partition is fixed by the world alone (not the seed): per content family, a seeded permutation gives each task that
draws from the family a test and a validation slice (HELD_OUT fractions); what remains is training content, shared
by the tasks. So no validation or test content appears in any other split of any task (nor, with `base.content:
train`, in the base's pretraining: flowopd.methods.pretrain). A held-out split shows each content once, in one
wording; the train split keeps every wording.
"""

import functools
import itertools
from dataclasses import asdict, dataclass

import numpy as np

from flowopd.spec.choices import OBJECT_FAMILIES, TASK_FAMILIES

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
OBJECT_KINDS = OBJECT_FAMILIES
QUALITY_TEMPLATES = (  # {} is a scene phrase: "a red circle", "two red circles", "a red circle left of a ..."
    "a clean, sharp render of {}",
    "a crisp picture of {} on white",
    "a tidy, noise-free image of {}",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SPLITS = ("train", "val", "test")
# Share of each content family held out per task that draws from it: a word belongs to the text task alone, a scene
# to the objects task and (its families in `quality_families`) the quality task. The main spec's world: 64 words give
# text 32 test / 16 validation words; 162 scenes give objects and quality 37 test / 19 validation scenes each.
HELD_OUT = {"text": {"test": 0.5, "val": 0.25}, "objects": {"test": 0.235, "val": 0.118},
            "quality": {"test": 0.235, "val": 0.118}}
SPLIT_SEED = 20240601  # fixes the partition once for all seeds


@dataclass(frozen=True)
class WorldConfig:
    canvas: int = 32
    alphabet: str = "ACEHKOTXLNFPMRDB"  # 16 letters Tesseract reads without an error in every pair
    word_length: int = 2
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    max_count: int = 3
    relations: tuple[str, ...] = ("left of", "right of", "above", "below")
    jitter: bool = True  # False: one canonical render per prompt (fixed sizes, centred layouts)
    quality_families: tuple[str, ...] = OBJECT_FAMILIES  # the scene families quality prompts ask for

    def __post_init__(self):
        object.__setattr__(self, "quality_families", tuple(self.quality_families))
        if unknown := [f for f in self.quality_families if f not in OBJECT_KINDS]:
            raise ValueError(f"unknown quality families {unknown}; expected some of {OBJECT_KINDS}")
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


def scene_phrase(scene: Prompt) -> str:
    """The scene an objects prompt asks for, without its frame: "a red circle left of a blue square"."""
    return scene.text.removeprefix("a photo of ")


def quality_scene(scene: Prompt, template: int = 0) -> Prompt:
    """The quality prompt asking for an objects prompt's scene: same content, quality's wording and reward."""
    text = QUALITY_TEMPLATES[template].format(scene_phrase(scene))
    return Prompt(text=text, task="quality", objects=scene.objects, relation=scene.relation, kind="quality")


def quality_prompt(colour: str, shape: str, template: int = 0) -> Prompt:
    return quality_scene(objects_prompt((ObjectGroup(colour, shape, 1),)), template)


def content_key(prompt: Prompt) -> tuple:
    """What the prompt's image must show, whatever the wording or task (see the module docstring); a prompt read
    from a file (no word, no objects) asks for its text."""
    if prompt.word:
        return ("word", prompt.word)
    if not prompt.objects:
        return ("text", prompt.text)
    groups, relation = tuple(prompt.objects), prompt.relation
    mirrored = {"right of": "left of", "below": "above"}
    if relation in mirrored:
        groups, relation = groups[::-1], mirrored[relation]
    if not relation and len(groups) == 2:  # 'a and b' is drawn as 'a left of b' (render._canonical_boxes): one image
        relation = "left of"
    return ("scene", relation, groups)


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
        scenes = all_prompts(world, "objects")
        return {family: tuple(quality_scene(p, t) for t in templates for p in scenes[family])
                for family in world.quality_families if family in scenes}
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


def _families_of(world: WorldConfig) -> dict[str, tuple[str, ...]]:
    """Content family -> the tasks that draw from it, in task order."""
    out: dict[str, list[str]] = {}
    for task in TASKS:
        for family in all_prompts(world, task):
            out.setdefault(family, []).append(task)
    return {family: tuple(tasks) for family, tasks in out.items()}


@functools.lru_cache(maxsize=64)
def content_partition(world: WorldConfig) -> dict[tuple, tuple[str, str]]:
    """content key -> (task, split) for held-out content; content absent from the map is training content."""
    families = _families_of(world)
    family_of: dict[tuple, str] = {}  # a content asked for by two families (a pair, a relation) counts in the first
    for family, tasks in families.items():
        for task in tasks:
            for p in all_prompts(world, task)[family]:
                family_of.setdefault(content_key(p), family)
    owner: dict[tuple, tuple[str, str]] = {}
    for family, tasks in families.items():
        keys = sorted((key for key, f in family_of.items() if f == family), key=repr)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(keys))
        at = 0
        for task in tasks:
            for split in ("test", "val"):
                n = round(HELD_OUT[task][split] * len(keys))
                owner.update({keys[i]: (task, split) for i in order[at:at + n]})
                at += n
    return owner


def split_prompts(world: WorldConfig, task: str, split: str) -> dict[str, list[Prompt]]:
    """A task's prompts of one split, by family: train keeps every wording of the training content; a held-out split
    has each of its contents once, in one wording fixed by SPLIT_SEED."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    owner = content_partition(world)
    families = all_prompts(world, task)
    if split == "train":
        out = {kind: [p for p in prompts if content_key(p) not in owner] for kind, prompts in families.items()}
        return {kind: prompts for kind, prompts in out.items() if prompts}
    wordings: dict[tuple, list[tuple[str, Prompt]]] = {}  # one content may be worded in two families
    for kind, prompts in families.items():
        for p in prompts:
            if owner.get(content_key(p)) == (task, split):
                wordings.setdefault(content_key(p), []).append((kind, p))
    pick = np.random.default_rng(SPLIT_SEED).integers(0, 1 << 30, size=len(wordings))
    out = {kind: [] for kind in families}
    for options, k in zip(wordings.values(), pick):
        kind, prompt = options[k % len(options)]
        out[kind].append(prompt)
    return {kind: prompts for kind, prompts in out.items() if prompts}


def distinct_contents(world: WorldConfig, task: str, split: str) -> int:
    return len({content_key(p) for family in split_prompts(world, task, split).values() for p in family})


def make_prompt_set(world: WorldConfig, task: str, n: int, seed: int, split: str) -> list[Prompt]:
    """n prompts of one task's split. Train: balanced over families, each family's shuffled pool cycled (a small
    family repeats). Held out: each round takes one unused prompt of every family that has one, so no prompt repeats
    before the whole split is used (the data stage refuses a set larger than its split)."""
    rng = np.random.default_rng(seed)
    families = split_prompts(world, task, split)
    if not families:
        raise ValueError(f"task {task!r} has no {split} prompts in this world")
    kinds = list(families)
    pools: dict[str, list[Prompt]] = {k: [] for k in kinds}
    picked: list[Prompt] = []
    while len(picked) < n:
        refill = split == "train" or not any(pools.values())
        for kind in kinds:
            if refill and not pools[kind]:
                pools[kind] = [families[kind][j] for j in rng.permutation(len(families[kind]))]
        for kind in kinds:
            if pools[kind] and len(picked) < n:
                picked.append(pools[kind].pop())
    return [picked[j] for j in rng.permutation(n)]


def sample_prompts(world: WorldConfig, rng: np.random.Generator, n: int) -> list[Prompt]:
    """n prompts from the whole grammar (every split): task uniform, family uniform, then prompt uniform."""
    grammar = {task: all_prompts(world, task) for task in TASKS}
    out = []
    for _ in range(n):
        families = grammar[TASKS[rng.integers(len(TASKS))]]
        family = list(families.values())[rng.integers(len(families))]
        out.append(family[rng.integers(len(family))])
    return out

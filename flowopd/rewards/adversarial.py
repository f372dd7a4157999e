"""Images a policy could reach without doing the task: the adversarial cases every tiny-world reward must refuse.

`adversarial_cases(world, prompts, rng)` -> {case name: (N,H,W,3) uint8}, one image per prompt, all of one task.
Each case is cheap for a policy to find and ignores (part of) the prompt: a blank or noisy canvas, one fixed image
for every prompt, the render of another prompt, a black blob, text where objects are asked and objects where text
is asked, the wrong colour or shape, a part of the target, several copies of it, every object at once.
tests/rewards/test_rewards_adversarial.py asserts each scores well below the ground-truth render;
benchmarks/bench_adversarial.py prints the table.
"""

from dataclasses import replace

import numpy as np

from flowopd.world.grammar import ObjectGroup, Prompt, WorldConfig, objects_prompt, text_prompt
from flowopd.world.render import BLACK, PALETTE, corrupt_prompt, render, shape_mask


def render_all(world: WorldConfig, prompts: list[Prompt], rng: np.random.Generator) -> np.ndarray:
    return np.stack([render(world, p, rng) for p in prompts])


def black_blob(world: WorldConfig) -> np.ndarray:
    """A crisp, centred black square a third of the canvas wide: clean and sharp, and nothing anyone asked for."""
    size = world.canvas
    image = np.full((size, size, 3), 255, np.uint8)
    image[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = BLACK
    return image


def every_object(world: WorldConfig) -> np.ndarray:
    """One of every colour x shape on a grid: whatever single object is asked for is somewhere in the picture."""
    items = [(c, s) for c in world.colours for s in world.shapes]
    side = int(np.ceil(np.sqrt(len(items))))
    cell = world.canvas // side
    size = max(4, cell - 3)
    image = np.full((world.canvas, world.canvas, 3), 255, np.uint8)
    for i, (colour, shape) in enumerate(items):
        top, left = (i // side) * cell + 1, (i % side) * cell + 1
        image[shape_mask(shape, size, world.canvas, top, left)] = PALETTE[colour]
    return image


def other_prompt(prompts: list[Prompt]) -> list[Prompt]:
    """For each prompt, another prompt of the set that asks for something else (the next different one)."""
    out = []
    for i, p in enumerate(prompts):
        others = [q for q in prompts[i + 1 :] + prompts[:i] if q.word != p.word or q.objects != p.objects]
        out.append(others[0] if others else p)
    return out


def wrong_shape(world: WorldConfig, prompt: Prompt) -> Prompt:
    """The same prompt with every object's shape replaced by the next shape of the world."""
    shapes = world.shapes
    groups = tuple(ObjectGroup(g.colour, shapes[(shapes.index(g.shape) + 1) % len(shapes)], g.count)
                   for g in prompt.objects)
    return replace(prompt, objects=groups)


def part_of(world: WorldConfig, prompt: Prompt, image: np.ndarray) -> np.ndarray:
    """A part of the target: the first letter of the word; the first object group alone (one of its count); the
    bottom half of a single object (a half disc, a bar, a trapezoid: none of the world's shapes)."""
    if prompt.word:
        return render(world, text_prompt(prompt.word[0]), np.random.default_rng(0))
    if len(prompt.objects) > 1 or prompt.objects[0].count > 1:
        g = prompt.objects[0]
        return render(world, objects_prompt((ObjectGroup(g.colour, g.shape, max(1, g.count - 1)),)),
                      np.random.default_rng(0))
    rows = np.nonzero((image != 255).any(-1).any(1))[0]
    half = image.copy()
    if len(rows):
        half[: (rows[0] + rows[-1] + 1) // 2] = 255
    return half


def copies_of(world: WorldConfig, prompt: Prompt) -> Prompt:
    """Several copies of the target: the word twice; one more of every object group (two for a single object),
    without the relation (the renderer places relations between two objects only)."""
    if prompt.word:
        return text_prompt(prompt.word * 2)
    return objects_prompt(tuple(ObjectGroup(g.colour, g.shape, g.count + 1) for g in prompt.objects))


def adversarial_cases(world: WorldConfig, prompts: list[Prompt], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{case: (N,H,W,3) uint8} for prompts of one task (text, objects or quality); "ground truth" is the reference."""
    tasks = {p.task for p in prompts}
    if len(tasks) != 1:
        raise ValueError(f"adversarial cases are built for one task at a time, got {sorted(tasks)}")
    task, n, size = tasks.pop(), len(prompts), world.canvas
    truth = render_all(world, prompts, rng)
    cases = {
        "ground truth": truth,
        "blank": np.full((n, size, size, 3), 255, np.uint8),
        "uniform noise": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "one fixed image": np.repeat(truth[:1], n, axis=0),
        "another prompt's image": render_all(world, other_prompt(prompts), rng),
        "black blob": np.repeat(black_blob(world)[None], n, axis=0),
        "part of the target": np.stack([part_of(world, p, x) for p, x in zip(prompts, truth)]),
        "several copies": render_all(world, [copies_of(world, p) for p in prompts], rng),
        "the asked colour everywhere": np.stack([np.full((size, size, 3), PALETTE[p.objects[0].colour] if p.objects
                                                         else BLACK, np.uint8) for p in prompts]),
    }
    if task == "text":
        cases["wrong word"] = render_all(world, [corrupt_prompt(world, p, rng) for p in prompts], rng)
        kinds = [ObjectGroup(c, s) for c in world.colours for s in world.shapes]
        objects = [objects_prompt((kinds[i % len(kinds)],)) for i in range(n)]
        cases["objects on a text prompt"] = render_all(world, objects, rng)
    else:
        cases["wrong colour"] = render_all(world, [corrupt_prompt(world, p, rng, "colour") for p in prompts], rng)
        cases["wrong shape"] = render_all(world, [wrong_shape(world, p) for p in prompts], rng)
        letters = world.alphabet
        words = [letters[i % len(letters)] + letters[(i + 1) % len(letters)] for i in range(n)]
        cases["text on an objects prompt"] = render_all(world, [text_prompt(w[: world.word_length]) for w in words],
                                                        rng)
        cases["every object at once"] = np.repeat(every_object(world)[None], n, axis=0)
    return cases

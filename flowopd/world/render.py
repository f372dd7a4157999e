"""Ground-truth renderer, prompt corruption and image degradation for the tiny world.

Renders are crisp: black glyphs or flat palette-coloured shapes on white, no anti-aliasing, so every pixel of a
ground-truth image is white, black or a palette colour. Positions and sizes carry a small seeded jitter.
"""

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from flowopd.spec.choices import FLAWS
from flowopd.world.grammar import (
    PALETTE,
    ObjectGroup,
    Prompt,
    WorldConfig,
    objects_prompt,
    scene_phrase,
    text_prompt,
)

BLACK = (0, 0, 0)
GLYPH_FONT_SIZE = 64  # letters are drawn large, then box-downsampled and thresholded (crisp, bold)
GLYPH_STROKE = 3
OBJECT_SIZE = (9, 12)  # bounding-box side of a shape in pixels on a 32 px canvas (inclusive range)
MIN_GAP = 3  # pixels of white between two objects' bounding boxes
DEGRADATIONS = FLAWS  # the spec's `base.flaws` keys
# Each task's bad mode: what a share `base.bad_modes[task]` of the base's training pairs shows instead of the clean
# render, so the base samples a good and a bad mode of every skill and a teacher can learn to pick the good one.
# Bad modes differ from the clean render in low-frequency content (a global tone, a layout), which a flow model
# decides in its first, high-noise steps; a high-frequency flaw (pixel noise, blur) is decided last and blends into
# every sample instead (the base then has no bad *mode*, only a uniformly mediocre one).
BAD_MODES = {
    "text": "vertical",  # the letters stacked top to bottom: a person reads it, the one-line OCR reward does not
    "objects": "swapped_colours",  # every object in the next colour of the world's list: each colour check fails
    "quality": "grey_background",  # the right scene on a grey ground instead of clean white
}
# Grey level of the quality bad mode's ground. Light enough that the object checker reads it as background (nearer
# white than black): quality prompts ask for the same scenes as objects prompts, and a base that carries the quality
# bad mode over to an objects prompt must not fail the objects check for it. A dark ground (80) did: the base's
# objects strict fell from 0.26 to 0.07-0.15 (two worlds, validation and training prompts).
GREY_BACKGROUND = 150


# ---------------------------------------------------------------- text
@functools.lru_cache(maxsize=4096)
def word_mask(word: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool ink mask of a word: Pillow's bundled FreeType font, thickened by a stroke."""
    font = ImageFont.load_default(size=GLYPH_FONT_SIZE)
    big = Image.new("L", (GLYPH_FONT_SIZE * (len(word) + 1), 2 * GLYPH_FONT_SIZE), 0)
    draw, x = ImageDraw.Draw(big), GLYPH_STROKE
    for ch in word:
        draw.text((x, 0), ch, font=font, fill=255, stroke_width=GLYPH_STROKE, stroke_fill=255)
        x += font.getbbox(ch)[2] + 8 + 2 * GLYPH_STROKE
    small = big.crop(big.getbbox()).resize((width, height), Image.Resampling.BOX)
    return np.asarray(small) >= 128


def render_text(world: WorldConfig, word: str, rng: np.random.Generator) -> np.ndarray:
    size, jitter = world.canvas, int(world.jitter)
    low, high = round(0.56 * size), round(0.63 * size)  # 18..20 px caps on 32 px
    height = int(rng.integers(low, high + 1)) if jitter else (low + high) // 2
    width = min(size - 4, round(0.44 * size) * len(word))
    top = (size - height) // 2 + int(rng.integers(-2, 3)) * jitter
    left = (size - width) // 2 + int(rng.integers(-1, 2)) * jitter
    image = np.full((size, size, 3), 255, np.uint8)
    image[top:top + height, left:left + width][word_mask(word, width, height)] = BLACK
    return image


def render_vertical_text(world: WorldConfig, word: str) -> np.ndarray:
    """The word's letters stacked top to bottom, each squeezed into its share of the canvas height."""
    size = world.canvas
    height, width = (size - 4) // len(word), round(0.44 * size)
    left = (size - width) // 2
    image = np.full((size, size, 3), 255, np.uint8)
    for k, letter in enumerate(word):
        top = 2 + k * height
        image[top:top + height, left:left + width][word_mask(letter, width, height)] = BLACK
    return image


# ---------------------------------------------------------------- shapes
def shape_mask(shape: str, size: int, canvas: int, top: int, left: int) -> np.ndarray:
    """(canvas, canvas) bool mask of one filled shape inside the box [top, top+size) x [left, left+size)."""
    y, x = np.mgrid[0:canvas, 0:canvas] + 0.5  # pixel centres
    v, u = y - top, x - left  # box coordinates
    inside = (u >= 0) & (u <= size) & (v >= 0) & (v <= size)
    if shape == "square":
        return inside
    if shape == "circle":
        r = size / 2
        return (u - r) ** 2 + (v - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base at the bottom of the box
        return inside & (np.abs(u - size / 2) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _place(sizes: list[int], canvas: int, rng: np.random.Generator) -> tuple[list[int], list[tuple[int, int]]]:
    """Sizes and top-left corners of boxes pairwise at least MIN_GAP apart (rejection sampling; a crowded scene
    shrinks its boxes by a pixel per 200 failed tries)."""
    for shrink in range(max(sizes)):
        sized = [max(4, s - shrink) for s in sizes]
        for _ in range(200):
            boxes = []
            for s in sized:
                top, left = (int(v) for v in rng.integers(1, canvas - s, size=2))
                if any(top < t + z + MIN_GAP and t < top + s + MIN_GAP and left < ll + z + MIN_GAP and
                       ll < left + s + MIN_GAP for (t, ll), z in zip(boxes, sized)):
                    break
                boxes.append((top, left))
            if len(boxes) == len(sized):
                return sized, boxes
    raise ValueError(f"cannot place {len(sizes)} objects on a {canvas} px canvas")


def _place_relation(relation: str, sizes: list[int], canvas: int, rng) -> list[tuple[int, int]]:
    """Two boxes side by side along the relation's axis, a random gap of at least MIN_GAP + 2 px apart."""
    (s1, s2), margin = sizes, 1
    gap = int(rng.integers(MIN_GAP + 2, max(MIN_GAP + 3, canvas - 2 * margin - s1 - s2 + 1)))
    start = int(rng.integers(margin, max(margin + 1, canvas - margin - (s1 + gap + s2) + 1)))
    if relation in ("left of", "above"):  # along the axis: first object, gap, second object
        first, second = start, start + s1 + gap
    else:  # second object, gap, first object
        first, second = start + s2 + gap, start
    boxes = []
    for s, along in zip(sizes, (first, second)):
        across = int(np.clip(canvas // 2 - s // 2 + rng.integers(-4, 5), margin, canvas - margin - s))
        boxes.append((across, along) if relation in ("left of", "right of") else (along, across))
    return boxes


def _canonical_boxes(relation: str, n: int, canvas: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Fixed layout: objects of one size in a row (a column for above / below), evenly spaced and centred."""
    size = min(round(sum(OBJECT_SIZE) / 2 * canvas / 32), (canvas - (n + 1) * MIN_GAP) // n)
    gap = (canvas - n * size) // (n + 1)
    along = [gap + i * (size + gap) for i in range(n)]
    if relation in ("right of", "below"):  # the first object goes second along the axis
        along = along[::-1]
    across = (canvas - size) // 2
    boxes = [(a, across) if relation in ("above", "below") else (across, a) for a in along]
    return [size] * n, boxes


def render_objects(world: WorldConfig, groups: tuple[ObjectGroup, ...], relation: str, rng) -> np.ndarray:
    canvas = world.canvas
    items = [(g.colour, g.shape) for g in groups for _ in range(g.count)]
    scale = canvas / 32
    sizes = [round(int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1)) * scale) for _ in items]
    if not world.jitter:
        sizes, boxes = _canonical_boxes(relation, len(items), canvas)
    elif relation:
        boxes = _place_relation(relation, sizes, canvas, rng)
    else:
        sizes, boxes = _place(sizes, canvas, rng)
    image = np.full((canvas, canvas, 3), 255, np.uint8)
    for (colour, shape), s, (top, left) in zip(items, sizes, boxes):
        image[shape_mask(shape, s, canvas, top, left)] = PALETTE[colour]
    return image


def render(world: WorldConfig, prompt: Prompt, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth (H, W, 3) uint8 image for a prompt."""
    if prompt.task == "text":
        return render_text(world, prompt.word, rng)
    return render_objects(world, prompt.objects, prompt.relation, rng)


# ---------------------------------------------------------------- training-pair flaws
def corrupt_prompt(world: WorldConfig, prompt: Prompt, rng: np.random.Generator, kind: str | None = None) -> Prompt:
    """A prompt of the same task with one thing wrong: word, colour, count or relation (random if kind=None)."""
    if prompt.task == "text":
        letters = list(world.alphabet)
        word = prompt.word
        while word == prompt.word:
            word = "".join(rng.choice(letters, size=len(prompt.word)))
        return text_prompt(word)
    options = ["colour"] if len(world.colours) > 1 else []
    if prompt.task == "objects" and not prompt.relation:
        options.append("count")
    if prompt.relation and len(world.relations) > 1:
        options.append("relation")
    kind = kind or options[rng.integers(len(options))]
    if kind not in options:
        raise ValueError(f"cannot corrupt the {kind!r} of {prompt.text!r}; options: {options}")
    groups = list(prompt.objects)
    i = int(rng.integers(len(groups)))
    g = groups[i]
    taken = {(h.colour, h.shape) for j, h in enumerate(groups) if j != i}
    if kind == "colour":
        colours = [c for c in world.colours if c != g.colour and (c, g.shape) not in taken]
        groups[i] = ObjectGroup(colours[rng.integers(len(colours))], g.shape, g.count)
    elif kind == "count":
        counts = [n for n in range(1, world.max_count + 1) if n != g.count]
        groups[i] = ObjectGroup(g.colour, g.shape, counts[rng.integers(len(counts))])
    relation = prompt.relation
    if kind == "relation":
        others = [r for r in world.relations if r != relation]
        relation = others[rng.integers(len(others))]
    corrupted = objects_prompt(tuple(groups), relation)
    if prompt.task == "quality":  # the same wording around the corrupted scene
        asked = scene_phrase(objects_prompt(prompt.objects, prompt.relation))
        return Prompt(text=prompt.text.replace(asked, scene_phrase(corrupted)), task="quality",
                      objects=corrupted.objects, relation=corrupted.relation, kind="quality")
    return corrupted


def render_bad_mode(world: WorldConfig, prompt: Prompt, rng: np.random.Generator) -> np.ndarray:
    """The render of a prompt in its task's bad mode (BAD_MODES)."""
    if prompt.task == "text":
        return render_vertical_text(world, prompt.word)
    if prompt.task == "objects":
        colours = world.colours
        groups = tuple(ObjectGroup(colours[(colours.index(g.colour) + 1) % len(colours)], g.shape, g.count)
                       for g in prompt.objects)
        return render_objects(world, groups, prompt.relation, rng)
    if prompt.task == "quality":
        image = render(world, prompt, rng)
        return np.where((image == 255).all(-1, keepdims=True), GREY_BACKGROUND, image).astype(np.uint8)
    raise ValueError(f"no bad mode for task {prompt.task!r}")


def degrade(image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """A flawed copy of a render: "noise" (Gaussian pixel noise) or "blur" (Gaussian blur)."""
    if kind == "noise":
        sigma = rng.uniform(40.0, 60.0)
        return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        radius = rng.uniform(1.5, 2.5) * image.shape[0] / 32
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")

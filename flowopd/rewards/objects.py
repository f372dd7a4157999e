"""Object reward (GenEval-style): colour segmentation, connected components, shape classification, checks.

Checks per prompt: for every object group, the number of components of its colour and shape equals its count; for a
relation, the largest components of the two groups stand in that relation (GenEval's centroid rule).
score = share of checks passed x share of the drawn components that the prompt asks for (partial credit);
strict = all checks pass and nothing else is drawn.

"Nothing else" is stricter than GenEval, which ignores unrequested objects: without it, one picture of every colour
and shape passes every single-object prompt, and a policy unsure of a colour can hedge by drawing both. Shapes are
drawn in square boxes and small, so a component whose box is far from square (a half disc, a bar) or that covers
much of the canvas (a painted background) is no shape at all.
"""

import numpy as np

from flowopd.world.grammar import PALETTE, Prompt, WorldConfig

COLOUR_TOLERANCE = 150.0  # max RGB distance from a palette colour for a pixel to belong to it
MIN_AREA = 6  # components smaller than this (pixels, on a 32 px canvas) are specks, not objects
MIN_ASPECT = 0.75  # box side ratio below which a component is no shape (renders: >= 0.9)
MAX_SHARE = 0.3  # share of the canvas above which a component is a background, not an object (renders: <= 0.15)
POSITION_THRESHOLD = 0.1  # GenEval: offsets within 0.1 x (sum of box sizes) count as no offset


def palette_masks(images: np.ndarray, colours: tuple[str, ...]) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,K,H,W) bool: pixel nearest to palette colour k (vs white, black, the others)."""
    refs = np.array([PALETTE[c] for c in colours] + [(255, 255, 255), (0, 0, 0)], dtype=np.float32)
    diff = images[..., None, :].astype(np.float32) - refs
    dist2 = np.einsum("nhwkc,nhwkc->nhwk", diff, diff)  # squared RGB distance to each reference, (N,H,W,K+2)
    nearest = dist2.argmin(-1)
    masks = (nearest[..., None] == np.arange(len(colours))) & (dist2[..., : len(colours)] < COLOUR_TOLERANCE**2)
    return masks.transpose(0, 3, 1, 2)


def label_components(masks: np.ndarray) -> np.ndarray:
    """8-connected component labels of a batch of (..., H, W) bool masks: 0 = background, else an id per component.

    Max-label propagation: every pixel takes the largest label in its 3x3 window until nothing changes (iterating
    only over the masks that are not empty and not yet settled).
    """
    h, w = masks.shape[-2:]
    flat = masks.reshape(-1, h, w)
    labels = np.where(flat, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), 0).astype(np.int32)
    active = np.nonzero(flat.any((1, 2)))[0]
    padded = np.zeros((len(active), h + 2, w + 2), np.int32)
    while len(active):
        current = labels[active]
        padded = padded[: len(active)]
        padded[:, 1:-1, 1:-1] = current
        rows = np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
        window = np.maximum(np.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])
        new = np.where(flat[active], window, 0)
        changed = (new != current).any((1, 2))
        labels[active] = new
        active = active[changed]
    return labels.reshape(masks.shape)


def classify_shapes(area, height, width, top_area) -> np.ndarray:
    """circle / square / triangle from the fill of the bounding box and the mass in its top half; "other" when the
    box is far from square."""
    fill = area / (height * width)
    top_share = top_area / area  # triangle (apex up): ~1/4 of its area lies in the top half; others ~1/2
    shape = np.where(top_share < 0.36, "triangle", np.where(fill > 0.88, "square", "circle"))
    return np.where(np.minimum(height, width) / np.maximum(height, width) < MIN_ASPECT, "other", shape)


def find_objects(images: np.ndarray, colours: tuple[str, ...]) -> list[list[dict]]:
    """Per image, a list of components: colour, shape, area, centre (x, y), box size (w, h)."""
    n, h, w = images.shape[:3]
    labels = label_components(palette_masks(images, colours))  # (N,K,H,W)
    img, k, ys, xs = np.nonzero(labels)
    key = (img * len(colours) + k) * (h * w + 1) + labels[img, k, ys, xs]
    uniq, inv = np.unique(key, return_inverse=True)
    area = np.bincount(inv).astype(np.float64)
    cx, cy = np.bincount(inv, xs + 0.5) / area, np.bincount(inv, ys + 0.5) / area
    y0, y1, x0, x1 = (np.full(len(uniq), v) for v in (h, -1, w, -1))
    np.minimum.at(y0, inv, ys), np.maximum.at(y1, inv, ys), np.minimum.at(x0, inv, xs), np.maximum.at(x1, inv, xs)
    height, width = y1 - y0 + 1, x1 - x0 + 1
    top_area = np.bincount(inv, (ys + 0.5) < (y0[inv] + height[inv] / 2), minlength=len(uniq))
    shapes = np.where(area > MAX_SHARE * h * w, "other", classify_shapes(area, height, width, top_area))
    comp_img, comp_k = np.divmod(uniq // (h * w + 1), len(colours))
    min_area = MIN_AREA * h * w / 1024
    found = [[] for _ in range(n)]
    for i in np.nonzero(area >= min_area)[0]:
        found[comp_img[i]].append({"colour": colours[comp_k[i]], "shape": str(shapes[i]), "area": area[i],
                                   "centre": (cx[i], cy[i]), "size": (width[i], height[i])})
    return found


def relations_between(a: dict, b: dict) -> set[str]:
    """GenEval's relative position of a with respect to b (image y grows downwards)."""
    offset = np.subtract(a["centre"], b["centre"])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * np.add(a["size"], b["size"]), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, ok in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                            ("below", dy > 0.5)) if ok}


def check_prompt(objects: list[dict], prompt: Prompt) -> tuple[list[bool], int]:
    """(checks passed or not, number of components the prompt does not ask for: other kinds and extra copies)."""
    checks, largest, asked = [], [], 0
    for g in prompt.objects:
        matches = [o for o in objects if o["colour"] == g.colour and o["shape"] == g.shape]
        checks.append(len(matches) == g.count)
        largest.append(max(matches, key=lambda o: o["area"]) if matches else None)
        asked += min(len(matches), g.count)
    if prompt.relation:
        a, b = largest[:2]
        checks.append(a is not None and b is not None and prompt.relation in relations_between(a, b))
    return checks, len(objects) - asked


class ObjectsReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {"score" (partial credit), "strict"} per sample."""

    name = "objects"

    def __init__(self, world: WorldConfig | None = None):
        self.colours = (world or WorldConfig()).colours

    def __call__(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]:
        if not all(p.objects for p in prompts):
            raise ValueError("the objects reward scores prompts with objects only (objects and quality tasks)")
        found = find_objects(np.asarray(images), self.colours)
        checks, extras = zip(*(check_prompt(objs, p) for objs, p in zip(found, prompts)))
        drawn = np.array([len(objs) for objs in found])
        precision = np.where(drawn > 0, 1 - np.array(extras) / np.maximum(drawn, 1), 1.0)
        score = np.array([np.mean(c) for c in checks]) * precision
        strict = np.array([all(c) and e == 0 for c, e in zip(checks, extras)], dtype=np.float64)
        return {"score": score.astype(np.float64), "strict": strict}

"""Prompt-aware quality reward: a clean, sharp render OF WHAT THE PROMPT ASKS (as PickScore judges image and prompt).

score = content * finish, both in [0, 1]. An image-only score pays a crisp black blob as much as the asked red
circle, so a policy could ignore the prompt; the product pays only a clean render of the asked content.

finish (image only; each term is also returned as an extra metric):
- background: share of background pixels (nearer white than any ink colour) that are clean white;
- sharpness: edge energy concentration, sum(d^2) / (sum(d) * CONTRAST) over neighbour steps d > EDGE_MIN: a crisp
  edge is one full-contrast step (ratio 1), a blurred edge spreads the same change over k steps (ratio ~1/k);
- palette: share of ink pixels (nearer an ink colour than white) close to a palette colour or black;
- presence: min(1, ink pixels / MIN_INK), so an empty canvas does not score as "clean";
  finish = presence * (background + sharpness + palette) / 3 (the reward's whole score before it read prompts).

content (does the image show the prompt's one object, the asked shape in the asked colour, and nothing else?):
- colour: share of ink pixels (not nearest white) nearer the segment from white to the asked colour (the colour and
  its blends with white at blurred edges) than to any other palette colour or black;
- an analysis-by-synthesis fit: the ink map a(x) (how far each pixel lies from white towards the asked colour, zero
  on other inks, less the background's own level) is compared with each shape's template of the same mass and
  centroid, blurred by the best of a few Gaussian widths, both seen through a SMOOTH px Gaussian. Mass and centroid
  are invariant under blur, so a blurred render of the right shape still fits its own template (blur is the
  finish's business); r_s = (sum (a - T_s)^2 - the background noise's expected part of it) / mass: the mismatched
  share of the object;
- shape = SHAPE_FLOOR + (1 - SHAPE_FLOOR) x softmax(-r / SHAPE_TEMPERATURE) over circle, square, triangle and
  "none" (r = NO_SHAPE, raised by what the image's noise could explain), at the asked shape: the asked shape must
  explain the ink better than the other shapes (a clean wrong shape loses by r >= 0.04) and well enough (a half
  disc, two copies, a smear: r >= 0.1); the floor keeps the asked colour in any shape worth a little (a graded
  signal while a policy cannot draw the shape yet, far below a flawed render of the right shape);
- room: an object on white, not a painted canvas (full up to MAX_SHARE of the canvas, none from twice that);
  content = colour * shape * room.
Prompts that ask for something else use their task's own reward as content: several objects, counts or relations
the object checker's partial credit (flowopd.rewards.objects), words the OCR reward (flowopd.rewards.ocr).
"""

import numpy as np

from flowopd.rewards.objects import ObjectsReward
from flowopd.rewards.ocr import OCRReward
from flowopd.world.grammar import PALETTE, SHAPES, Prompt, WorldConfig

CLEAN_WHITE = 24.0  # RGB distance from white within which a background pixel is clean
PALETTE_TOLERANCE = 40.0  # RGB distance from a palette colour (or black) within which an ink pixel is faithful
EDGE_MIN = 24.0  # neighbour steps (max over channels) below this are not edges
CONTRAST = 200.0  # step of a crisp palette / black edge on white (>= 225 in the max-channel norm)
MIN_INK = 24  # ink pixels (on a 32 px canvas) for a full presence term
SMOOTH = 0.5  # Gaussian std (px on 32 px) through which the ink map and the templates are compared
BLUR_WIDTHS = (0.0, 0.7, 1.2, 1.7, 2.2, 2.7, 3.2)  # Gaussian std (px on 32 px) tried for the templates' blur
UNCLIPPED = 1 / (0.5 - 1 / (2 * np.pi))  # noise variance on ink / on white (clipped at 255: a half-normal)
NO_SHAPE = 0.08  # mismatch r of "none of the shapes", the softmax's fourth option, on a noise-free image
NOISE_SLACK = 8.0  # ... plus this many times the background noise's expected share of r
SHAPE_TEMPERATURE = 0.005  # of r, in the softmax over shapes
SHAPE_FLOOR = 0.01  # shape term of the asked colour drawn in no or another shape: a graded start for a teacher
FAR_FROM_INK = 4  # px (on 32 px): white pixels this far from ink measure the background's level
MAX_SHARE = 0.25  # share of the canvas an object may cover in full (renders: <= 0.15); none from twice that
MIN_MASS = 4.0  # ink mass (pixels of full colour, on 32 px) below which there is no object to fit


def squared_distances(x: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(..., 3) pixels, (K, 3) colours -> (..., K) squared RGB distances, |x|^2 - 2 x.r + |r|^2 (one matmul)."""
    return np.maximum((x**2).sum(-1, keepdims=True) - 2 * x @ refs.T + (refs**2).sum(-1), 0)


def quality_terms(images: np.ndarray, colours: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The image-only terms (background, sharpness, palette, presence) and finish, each (N,) in [0, 1]."""
    x = np.asarray(images, dtype=np.float32)
    n, h, w = x.shape[:3]
    refs = np.array([PALETTE[c] for c in colours] + [(0, 0, 0), (255, 255, 255)], dtype=np.float32)
    dist2 = squared_distances(x, refs)
    d_white, d_ink = np.sqrt(dist2[..., -1]), np.sqrt(dist2[..., :-1].min(-1))  # (N,H,W)
    is_ink = d_ink < d_white
    n_ink, n_bg = is_ink.sum((1, 2)), (~is_ink).sum((1, 2))
    background = np.where(n_bg > 0, ((~is_ink) & (d_white < CLEAN_WHITE)).sum((1, 2)) / np.maximum(n_bg, 1), 1.0)
    palette = np.where(n_ink > 0, (is_ink & (d_ink < PALETTE_TOLERANCE)).sum((1, 2)) / np.maximum(n_ink, 1), 1.0)
    steps = np.concatenate([np.abs(np.diff(x, axis=1)).max(-1).reshape(n, -1),
                            np.abs(np.diff(x, axis=2)).max(-1).reshape(n, -1)], axis=1)
    steps = np.where(steps > EDGE_MIN, steps, 0.0)
    total = steps.sum(1)
    sharpness = np.where(total > 0, np.clip((steps**2).sum(1) / np.maximum(total, 1e-6) / CONTRAST, 0, 1), 1.0)
    presence = np.minimum(1.0, n_ink / (MIN_INK * h * w / 1024))
    finish = presence * (background + sharpness + palette) / 3
    return {"background": background, "sharpness": sharpness, "palette": palette, "presence": presence,
            "finish": finish}


def shape_templates(mass: np.ndarray, cx: np.ndarray, cy: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N,) mass and centroid -> (N, 3, H, W) coverage of a circle, square and apex-up triangle (SHAPES order) of that
    area whose centroid is (cx, cy), shaped as the renderer draws them (flowopd.world.render.shape_mask).

    Coverage = clip(signed distance to the outline + 1/2, 0, 1): anti-aliased, so smooth in size and position.
    """
    u = (np.arange(w, dtype=np.float32) + 0.5)[None, None, :] - cx[:, None, None]  # (N, 1, W) from the centroid
    v = (np.arange(h, dtype=np.float32) + 0.5)[None, :, None] - cy[:, None, None]  # (N, H, 1)
    m = mass[:, None, None]
    radius, half, base = np.sqrt(m / np.pi), np.sqrt(m) / 2, np.sqrt(2 * m)  # base = height of the triangle

    def cover(distance):
        return np.clip(distance + 0.5, 0, 1)

    circle = cover(radius - np.sqrt(u**2 + v**2))
    square = cover(half - np.abs(u)) * cover(half - np.abs(v))
    depth = v + 2 * base / 3  # below the apex (the centroid lies 2/3 of the height down)
    triangle = cover(np.minimum(base - depth, (depth / 2 - np.abs(u)) * 2 / np.sqrt(5)))
    return np.stack(np.broadcast_arrays(circle, square, triangle), axis=1)


def gaussian_matrix(std: float, n: int) -> np.ndarray:
    """(n, n) row-normalised Gaussian: G T G^T blurs an (n, n) image T by std pixels."""
    i = np.arange(n, dtype=np.float32)
    g = np.exp(-0.5 * ((i[:, None] - i[None]) / std) ** 2)
    return g / g.sum(1, keepdims=True)


def blur_all(templates: np.ndarray, blur: np.ndarray) -> np.ndarray:
    """(N,S,H,W) images, (B,H,H) Gaussian matrices -> (N,S,B,H,W) G_b T G_b^T, as two large matmuls."""
    n, s, h, w = templates.shape
    b = len(blur)
    columns = blur.reshape(b * h, h) @ templates.transpose(2, 0, 1, 3).reshape(h, n * s * w)  # (B*H, N*S*W)
    both = columns.reshape(b, h * n * s, w) @ blur.transpose(0, 2, 1)  # (B, H*N*S, W)
    return both.reshape(b, h, n, s, w).transpose(2, 3, 0, 1, 4)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """(N,H,W) bool -> True within `radius` pixels (Chebyshev) of a True pixel."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[:, :, 1:] |= grown[:, :, :-1].copy()
        grown[:, :, :-1] |= grown[:, :, 1:].copy()
        out = grown
    return out


def asked_ink(images: np.ndarray, colours: tuple[str, ...], colour_index: np.ndarray) -> dict[str, np.ndarray]:
    """The ink map a(x) of the asked colour (N,H,W), with the masks and colour share it is built from."""
    x = np.asarray(images, dtype=np.float32)
    n, h = x.shape[:2]
    refs = np.array([PALETTE[c] for c in colours] + [(255, 255, 255), (0, 0, 0)], dtype=np.float32)
    dist2 = squared_distances(x, refs)  # (N,H,W,K+2)
    white = dist2.argmin(-1) == len(colours)
    # own ink: pixels nearer the segment from white to the asked colour (the colour, and its blends with white at
    # blurred edges) than to any other ink (other palette colours, black)
    towards = 255.0 - refs[colour_index]  # (N, 3)
    ink = np.einsum("nhwc,nc->nhw", 255.0 - x, towards) / (towards**2).sum(1)[:, None, None]  # share of the way
    on_segment = 255.0 - np.clip(ink, 0, 1)[..., None] * towards[:, None, None]
    others = dist2.copy()
    others[np.arange(n), ..., colour_index] = np.inf
    others[..., len(colours)] = np.inf
    own = ((x - on_segment) ** 2).sum(-1) <= others.min(-1)
    colour = (own & ~white).sum((1, 2)) / np.maximum((~white).sum((1, 2)), 1)
    # background level: the mean ink of the white pixels far from solid ink (noise on white is clipped at 255, so
    # it leans towards ink; blurred edges lie near ink), subtracted unclipped so that background noise adds no mass
    solid = ~dilate(white, 1)  # ink that survives a 3 x 3 erosion: shapes, not specks of noise
    far = ~dilate(solid, 1 + round(FAR_FROM_INK * h / 32))
    level = (ink * far).sum((1, 2)) / np.maximum(far.sum((1, 2)), 1)
    return {"ink": (ink - level[:, None, None]) * own, "colour": colour, "own": own, "white": white, "far": far}


def single_object_content(images: np.ndarray, colours: tuple[str, ...], colour_index: np.ndarray,
                          shape_index: np.ndarray) -> dict[str, np.ndarray]:
    """content, colour, shape and the asked shape's mismatch r per image, for prompts asking one object
    (colour_index into colours, shape_index into SHAPES); see the module docstring."""
    a = asked_ink(images, colours, colour_index)
    ink, own, white, far = a["ink"], a["own"], a["white"], a["far"]
    n, h, w = ink.shape
    mass = ink.sum((1, 2))
    present = mass >= MIN_MASS * h * w / 1024
    safe = np.where(present, mass, 1.0)
    cy = (ink.sum(2) * (np.arange(h) + 0.5)).sum(1) / safe
    cx = (ink.sum(1) * (np.arange(w) + 0.5)).sum(1) / safe
    templates = shape_templates(safe.astype(np.float32), cx, cy, h, w)
    # both seen through a SMOOTH px Gaussian (pixel noise and the templates' aliasing fade, shapes stay); the
    # templates also through each of BLUR_WIDTHS (Gaussian blurs compose: widths add in quadrature)
    scale = h / 32  # square canvases
    smooth = gaussian_matrix(SMOOTH * scale, h)
    ink = smooth @ ink @ smooth.T
    variance = (ink**2 * far).sum((1, 2)) / np.maximum(far.sum((1, 2)), 1)  # of noise on white, per pixel
    noise = variance * ((own & white).sum((1, 2)) + UNCLIPPED * (own & ~white).sum((1, 2)))  # expected energy
    blur = np.stack([gaussian_matrix(np.hypot(SMOOTH, b) * scale, h) for b in BLUR_WIDTHS])
    energy = ((ink[:, None, None] - blur_all(templates, blur)) ** 2).sum((-1, -2)).min(-1)  # (N, 3)
    mismatch = np.maximum(energy - noise[:, None], 0) / safe[:, None]  # r_s
    # "none of the shapes" wins past NO_SHAPE, raised by what the image's own noise could explain
    no_shape = NO_SHAPE + NOISE_SLACK * noise / safe
    logits = -np.concatenate([mismatch, no_shape[:, None]], axis=1) / SHAPE_TEMPERATURE
    posterior = np.exp(logits - logits.max(1, keepdims=True))
    posterior /= posterior.sum(1, keepdims=True)
    rows = np.arange(n)
    shape = np.where(present, SHAPE_FLOOR + (1 - SHAPE_FLOOR) * posterior[rows, shape_index], 0.0)
    room = np.clip((2 * MAX_SHARE - mass / (h * w)) / MAX_SHARE, 0, 1)  # an object on white, not a painted canvas
    return {"content": a["colour"] * shape * room, "colour": a["colour"], "shape": shape,
            "mismatch": mismatch[rows, shape_index]}


def is_single_object(prompt: Prompt) -> bool:
    return len(prompt.objects) == 1 and prompt.objects[0].count == 1 and not prompt.relation


class QualityReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {"score", "content", "finish", "background", "sharpness",
    "palette"} per sample; score = content * finish (see the module docstring)."""

    name = "quality"

    def __init__(self, world: WorldConfig | None = None):
        self.world = world or WorldConfig()
        self.colours = self.world.colours
        self.objects, self.ocr = ObjectsReward(self.world), OCRReward(self.world)

    def content(self, images: np.ndarray, prompts: list[Prompt]) -> np.ndarray:
        """(N,) how well each image shows what its prompt asks, in [0, 1]."""
        content = np.zeros(len(prompts))
        single = [i for i, p in enumerate(prompts) if is_single_object(p)]
        if single:
            groups = [prompts[i].objects[0] for i in single]
            colour_index = np.array([self.colours.index(g.colour) for g in groups])
            shape_index = np.array([SHAPES.index(g.shape) for g in groups])
            content[single] = single_object_content(images[single], self.colours, colour_index, shape_index)["content"]
        scenes = [i for i, p in enumerate(prompts) if p.objects and not is_single_object(p)]
        words = [i for i, p in enumerate(prompts) if p.word]
        for reward, rows in ((self.objects, scenes), (self.ocr, words)):
            if rows:
                content[rows] = reward(images[rows], [prompts[i] for i in rows])["score"]
        return content

    def __call__(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        unknown = [p.text for p in prompts if not (p.objects or p.word)]
        if unknown:
            raise ValueError(f"the quality reward needs prompts with objects or a word, got {unknown[:3]}")
        terms = quality_terms(images, self.colours)
        content = self.content(images, prompts)
        out = {"score": content * terms["finish"], "content": content} | {
            k: terms[k] for k in ("finish", "background", "sharpness", "palette")}
        return {k: v.astype(np.float64) for k, v in out.items()}

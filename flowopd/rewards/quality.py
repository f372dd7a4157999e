"""Image-quality reward: clean background, sharp edges, faithful palette (image only, no prompt).

score = presence * (background + sharpness + palette) / 3, each term in [0, 1]:
- background: share of background pixels (nearer white than any ink colour) that are clean white;
- sharpness: edge energy concentration, sum(d^2) / (sum(d) * CONTRAST) over neighbour steps d > EDGE_MIN: a crisp
  edge is one full-contrast step (ratio 1), a blurred edge spreads the same change over k steps (ratio ~1/k);
- palette: share of ink pixels (nearer an ink colour than white) close to a palette colour or black;
- presence: min(1, ink pixels / MIN_INK) so an empty canvas does not score as "clean".
"""

import numpy as np

from flowopd.world.grammar import PALETTE, Prompt, WorldConfig

CLEAN_WHITE = 24.0  # RGB distance from white within which a background pixel is clean
PALETTE_TOLERANCE = 40.0  # RGB distance from a palette colour (or black) within which an ink pixel is faithful
EDGE_MIN = 24.0  # neighbour steps (max over channels) below this are not edges
CONTRAST = 200.0  # step of a crisp palette / black edge on white (>= 225 in the max-channel norm)
MIN_INK = 24  # ink pixels (on a 32 px canvas) for a full presence term


def quality_terms(images: np.ndarray, colours: tuple[str, ...]) -> dict[str, np.ndarray]:
    x = np.asarray(images, dtype=np.float32)
    n, h, w = x.shape[:3]
    inks = np.array([PALETTE[c] for c in colours] + [(0, 0, 0)], dtype=np.float32)
    d_white = np.linalg.norm(x - 255.0, axis=-1)  # (N,H,W)
    d_ink = np.linalg.norm(x[..., None, :] - inks, axis=-1).min(-1)
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
    return {"background": background, "sharpness": sharpness, "palette": palette, "presence": presence}


class QualityReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {"score", "background", "sharpness", "palette"} per sample."""

    name = "quality"

    def __init__(self, world: WorldConfig | None = None):
        self.colours = (world or WorldConfig()).colours

    def __call__(self, images: np.ndarray, prompts: list[Prompt] | None = None) -> dict[str, np.ndarray]:
        t = quality_terms(images, self.colours)
        score = t["presence"] * (t["background"] + t["sharpness"] + t["palette"]) / 3
        return {"score": score.astype(np.float64)} | {k: t[k].astype(np.float64) for k in
                                                      ("background", "sharpness", "palette")}

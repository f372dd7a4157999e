"""OCR reward: Tesseract reads the sign, scored by Flow-GRPO's rule.

score = 1 - min(edit_distance(read, target), len(target)) / len(target), and 1 when the target is a substring of the
read text (spaces removed); exact = read text equals the target. One in-process Tesseract instance per process.
"""

import functools
import glob
import os

import numpy as np

from flowopd.world.grammar import Prompt, WorldConfig

UPSCALE = 3  # Tesseract wants glyphs some tens of pixels tall; 32 px canvases carry ~19 px capitals
PAD = 4  # white margin (canvas pixels) around the word; a small page keeps a call near 2-3 ms
INK_THRESHOLD = 128  # a pixel is ink when its darkest channel is below this


def tessdata_dir() -> str:
    """Debian's tessdata folder (the one holding eng.traineddata); TESSDATA_PREFIX overrides."""
    candidates = [os.environ.get("TESSDATA_PREFIX", "")]
    candidates += sorted(glob.glob("/usr/share/tesseract-ocr/*/tessdata"), reverse=True)
    candidates += ["/usr/share/tesseract-ocr/tessdata", "/usr/share/tessdata"]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "eng.traineddata")):
            return path
    raise FileNotFoundError("no eng.traineddata found; install Debian's tesseract-ocr or set TESSDATA_PREFIX")


@functools.lru_cache(maxsize=4)
def tesseract(alphabet: str):
    """One Tesseract API per process and alphabet: single-line mode, characters limited to the alphabet."""
    from tesserocr import PSM, PyTessBaseAPI

    api = PyTessBaseAPI(path=tessdata_dir(), lang="eng", psm=PSM.SINGLE_LINE)
    api.SetVariable("tessedit_char_whitelist", alphabet)
    return api


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def flow_grpo_ocr_score(read: str, target: str) -> float:
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    if target in read:
        return 1.0
    return 1.0 - min(edit_distance(read, target), len(target)) / len(target)


def binarise(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H', W') uint8 black-on-white, padded and upscaled for Tesseract."""
    ink = images.min(axis=3) < INK_THRESHOLD
    ink = np.pad(ink, ((0, 0), (PAD, PAD), (PAD, PAD)))
    ink = ink.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)
    return np.where(ink, 0, 255).astype(np.uint8)


def read_text(images: np.ndarray, alphabet: str) -> list[str]:
    api = tesseract(alphabet)
    out = []
    for page in binarise(images):
        height, width = page.shape
        api.SetImageBytes(page.tobytes(), width, height, 1, width)  # raw 8-bit grey, no PIL round trip
        out.append(api.GetUTF8Text().strip())
    return out


class OCRReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {"score", "exact"} per sample."""

    name = "ocr"

    def __init__(self, world: WorldConfig | None = None):
        self.alphabet = (world or WorldConfig()).alphabet

    def __call__(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]:
        targets = [p.word for p in prompts]
        if not all(targets):
            raise ValueError("the OCR reward scores text prompts only (prompts with a word)")
        reads = read_text(np.asarray(images), self.alphabet)
        score = np.array([flow_grpo_ocr_score(r, t) for r, t in zip(reads, targets)], dtype=np.float64)
        exact = np.array([r.replace(" ", "") == t for r, t in zip(reads, targets)], dtype=np.float64)
        return {"score": score, "exact": exact}

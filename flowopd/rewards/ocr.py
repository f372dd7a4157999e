"""OCR reward: Tesseract reads the sign, scored by Flow-GRPO's rule.

score = 1 - min(edit_distance(read, target), len(target)) / len(target), and (scene reader, Flow-GRPO's rule) 1 when
the target is a substring of the read text (spaces removed); exact = read text equals the target. One in-process
Tesseract instance per process.

Two readers:
- tiny (no settings): the tiny world's 32 px renders, binarised (dark ink), padded, upscaled, one line, the world's
  alphabet as whitelist; target = the prompt's word. Scored by edit distance alone: the substring clause paid a
  sign showing the word twice ("KOKO" for "KO") in full, and this reader reads every ground-truth render exactly,
  so extra letters are the policy's, not the reader's.
- scene (settings: the spec's `ocr` mapping, for SD3-scale images): the greyscale image as is (Tesseract binarises
  itself), automatic page segmentation by default, any character unless a whitelist is given; target = the
  prompt's word, else its first double-quoted span (Flow-GRPO's rule `prompt.split('"')[1]` on its
  'A sign that says "..."' prompts). Everything Tesseract finds is joined without whitespace, so text over several lines still matches;
  case is ignored as in Flow-GRPO; exact = the target occurs verbatim (up to case and whitespace).
"""

import functools
import glob
import os

import numpy as np

from flowopd.world.grammar import Prompt, WorldConfig

UPSCALE = 3  # Tesseract wants glyphs some tens of pixels tall; 32 px canvases carry ~19 px capitals
PAD = 4  # white margin (canvas pixels) around the word; a small page keeps a call near 2-3 ms
INK_THRESHOLD = 128  # a pixel is ink when its darkest channel is below this
TINY_MAX_SIDE = 256  # larger images (SD3: 512 px) need the scene reader; refusing beats a silent wrong score


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


def edit_score(read: str, target: str) -> float:
    """1 - edit distance / target length, clipped at 0; spaces and case ignored."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    return 1.0 - min(edit_distance(read, target), len(target)) / len(target)


def flow_grpo_ocr_score(read: str, target: str) -> float:
    """Flow-GRPO's rule: edit_score, or 1 when the target occurs in the read text (spaces and case ignored)."""
    if target.replace(" ", "").lower() in read.replace(" ", "").lower():
        return 1.0
    return edit_score(read, target)


def binarise(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H', W') uint8 black-on-white, padded and upscaled for Tesseract."""
    ink = images.min(axis=3) < INK_THRESHOLD
    ink = np.pad(ink, ((0, 0), (PAD, PAD), (PAD, PAD)))
    ink = ink.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)
    return np.where(ink, 0, 255).astype(np.uint8)


def once_per_picture(read):
    """read(images (N,...) uint8, *args) -> list of N; wrapped so that identical pictures in a batch are read once
    (a policy that draws one picture for every prompt; one picture scored against several prompts)."""

    @functools.wraps(read)
    def wrapped(images: np.ndarray, *args, **kwargs) -> list[str]:
        images = np.asarray(images)
        first = {}  # picture bytes -> index of its first occurrence
        index = [first.setdefault(image.tobytes(), len(first)) for image in images]
        unique = [images[index.index(k)] for k in range(len(first))]
        reads = read(np.stack(unique), *args, **kwargs) if unique else []
        return [reads[k] for k in index]

    return wrapped


@once_per_picture
def read_text(images: np.ndarray, alphabet: str) -> list[str]:
    api = tesseract(alphabet)
    out = []
    for page in binarise(images):
        height, width = page.shape
        api.SetImageBytes(page.tobytes(), width, height, 1, width)  # raw 8-bit grey, no PIL round trip
        out.append(api.GetUTF8Text().strip())
    return out


PAGE_MODES = {"sparse_text": "SPARSE_TEXT", "single_line": "SINGLE_LINE", "single_block": "SINGLE_BLOCK",
              "auto": "AUTO"}  # spec's page_mode -> tesserocr.PSM member


@functools.lru_cache(maxsize=8)
def scene_tesseract(page_mode: str, whitelist: str | None):
    """One Tesseract API per process and (page mode, whitelist) for images of any size."""
    from tesserocr import PSM, PyTessBaseAPI

    if page_mode not in PAGE_MODES:
        raise ValueError(f"ocr.page_mode: unknown {page_mode!r}; expected one of {', '.join(PAGE_MODES)}")
    api = PyTessBaseAPI(path=tessdata_dir(), lang="eng", psm=getattr(PSM, PAGE_MODES[page_mode]))
    if whitelist:
        api.SetVariable("tessedit_char_whitelist", whitelist)
    return api


@once_per_picture
def read_scene(images: np.ndarray, page_mode: str = "auto", whitelist: str | None = None) -> list[str]:
    """All text Tesseract finds in each (N, H, W, 3) uint8 image, whitespace removed."""
    api = scene_tesseract(page_mode, whitelist)
    out = []
    for image in np.asarray(images):
        grey = np.ascontiguousarray(image.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])).round()
        grey = grey.clip(0, 255).astype(np.uint8)
        height, width = grey.shape
        api.SetImageBytes(grey.tobytes(), width, height, 1, width)
        out.append("".join(api.GetUTF8Text().split()))
    return out


def ocr_target(prompt) -> str:
    """The text the image should show: the prompt's word, else its first double-quoted span (Flow-GRPO)."""
    if getattr(prompt, "word", ""):
        return prompt.word
    parts = prompt.text.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(f'the OCR reward needs a word or a double-quoted text in the prompt: {prompt.text!r}')
    return parts[1]


class OCRReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {"score", "exact"} per sample.

    settings: None for the tiny reader, or the spec's OCRSettings (page_mode, whitelist) for the scene reader.
    """

    name = "ocr"

    def __init__(self, world: WorldConfig | None = None, settings=None):
        self.alphabet = (world or WorldConfig()).alphabet
        self.settings = settings

    def __call__(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]:
        if self.settings is not None:
            return self._scene(images, prompts)
        height, width = np.shape(images)[1:3]
        if max(height, width) > TINY_MAX_SIDE:
            raise ValueError(f"the tiny reader reads tiny renders (at most {TINY_MAX_SIDE} px), got {height}x{width}: "
                             "give the task `ocr` settings (the scene reader; flowopd.rewards.task_reward)")
        targets = [p.word for p in prompts]
        if not all(targets):
            raise ValueError("the OCR reward scores text prompts only (prompts with a word)")
        reads = read_text(np.asarray(images), self.alphabet)
        score = np.array([edit_score(r, t) for r, t in zip(reads, targets)], dtype=np.float64)
        exact = np.array([r.replace(" ", "") == t for r, t in zip(reads, targets)], dtype=np.float64)
        return {"score": score, "exact": exact}

    def _scene(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]:
        targets = [ocr_target(p) for p in prompts]
        reads = read_scene(images, self.settings.page_mode, self.settings.whitelist)
        score = np.array([flow_grpo_ocr_score(r, t) for r, t in zip(reads, targets)], dtype=np.float64)
        exact = np.array(["".join(t.split()).lower() in r.lower() for r, t in zip(reads, targets)],
                         dtype=np.float64)
        return {"score": score, "exact": exact}

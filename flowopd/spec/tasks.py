"""The task sections: the tiny world, prompt sets, rewards with their settings, and the evaluation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from flowopd.spec import choices as C
from flowopd.spec.fields import (
    DecodeBatch,
    MicroBatch,
    Name,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Section,
    Seed,
    SpecPath,
    TinyTask,
    unique,
    without_memory_defaults,
)
from flowopd.spec.model import SamplerSettings


class World(Section):
    """The tiny synthetic world (flowopd.world.WorldConfig takes these as keyword arguments)."""

    canvas: PositiveInt = 32
    alphabet: Annotated[str, Field(min_length=2)] = "ACEHKOTXLNFPMRDB"
    word_length: PositiveInt = 2
    colours: Annotated[tuple[str, ...], Field(min_length=1)] = ("red", "green", "blue", "yellow", "purple")
    shapes: Annotated[tuple[str, ...], Field(min_length=1)] = ("circle", "square", "triangle")
    max_count: PositiveInt = 3
    relations: tuple[str, ...] = ("left of", "right of", "above", "below")
    jitter: bool = True
    """Random sizes and positions; false: every prompt has one canonical render (easier to learn in minutes)."""
    quality_families: Annotated[tuple[Literal[C.OBJECT_FAMILIES], ...], Field(min_length=1)] = C.OBJECT_FAMILIES
    """The scene families quality prompts ask for ("a clean render of ..."); they share content with objects."""

    _check_unique = field_validator("alphabet", "colours", "shapes", "relations", "quality_families")(unique)


# ---------------------------------------------------------------- tasks
class TinyPrompts(Section):
    """Prompts drawn from the tiny world's grammar: train, validation and test splits, content-disjoint."""

    kind: Literal["tiny"]
    task: TinyTask
    n_train: PositiveInt = 256
    n_val: PositiveInt = 64
    """Distinct validation prompts, for tuning; the test split is for the report only."""
    n_test: PositiveInt = 64


class FilePrompts(Section):
    """Prompts read from files (paths relative to the repository root)."""

    kind: Literal["file"]
    train: SpecPath
    val: SpecPath | None = None
    """Validation prompts; absent: the task has no validation split, and an evaluation on `val` is refused."""
    test: SpecPath
    format: Literal[C.PROMPT_FILE_FORMATS] = "lines"

    @model_serializer(mode="wrap")
    def _omit_absent_val(self, handler):
        """An absent `val` is left out of the dump, so specs written before it existed keep their hash."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "val" and v is None)}


PromptSource = Annotated[TinyPrompts | FilePrompts, Field(discriminator="kind")]


# ---------------------------------------------------------------- reward settings (GPU-scale scorers)
class OCRSettings(Section):
    """Tesseract on generated images of any size (SD3 scale): the greyscale image as is, Tesseract's own
    binarisation, target = the prompt's first double-quoted span (Flow-GRPO's OCR prompts: 'A sign that says "..."').
    Absent: the tiny world's reader (binarised ink, upscaled, the world's alphabet as whitelist)."""

    page_mode: Literal[C.OCR_PAGE_MODES] = "auto"
    """Tesseract page segmentation (auto: full layout analysis; sparse_text missed large text on a sign here)."""
    whitelist: Annotated[str, Field(min_length=1)] | None = None
    """Characters Tesseract may read; null: any."""


class PickScoreSettings(Section):
    """PickScore (Kirstain et al. 2023): a CLIP fine-tuned on Pick-a-Pic human preferences;
    score = logit_scale * cos(image embedding, text embedding); SD3.5-M scores about 21.6 (the paper divides by 26)."""

    model: SpecPath
    """Folder of the transformers CLIPModel (yuvalkirstain/PickScore_v1 downloaded), or a hub id when online."""
    processor: SpecPath | None = None
    """Folder of its CLIPProcessor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); null: the model folder."""
    batch_size: PositiveInt = 32
    dtype: Literal[C.DTYPES] = "fp32"


class RemoteSettings(Section):
    """An external reward server (GenEval, DeQA, ... as Flow-GRPO runs them), spoken to in flowopd's JSON protocol
    (flowopd/rewards/remote.py): POST {"images": [base64 PNG], "prompts": [...], "metadata": [...]},
    answer {metric: [one number per image], ...}."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+")]
    metrics: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)] = ("score",)
    """Keys the server returns; "score" (the training reward) among them."""
    timeout: PositiveFloat = 120.0
    """Seconds to wait for one request (Flow-GRPO: 120)."""
    retries: NonNegInt = 3
    """Further attempts after a failed request (connection error, timeout, HTTP 5xx or 429)."""
    backoff: NonNegFloat = 1.0
    """Seconds before the first retry, doubled before each next one."""
    batch_size: PositiveInt = 64
    """Images per request (Flow-GRPO: 64)."""

    _check_unique = field_validator("metrics")(unique)

    @field_validator("metrics")
    @classmethod
    def _has_score(cls, value):
        if "score" not in value:
            raise ValueError('must include "score" (the key the trainers optimise)')
        return value


class Task(Section):
    """A prompt set with its reward; its benchmark is the split `evaluation.split` names, scored by `metric`."""

    prompts: PromptSource
    reward: Literal[C.REWARDS]
    metric: Annotated[str, Field(min_length=1)] = "score"
    """Headline metric key of the reward's output (objects: strict, ocr: score or exact)."""
    normaliser: PositiveFloat = 1.0
    """Avg = mean over tasks of metric / normaliser (the paper divides DeQA by 5, PickScore by 26)."""
    ocr: OCRSettings | None = None
    """reward ocr: read SD3-scale images (absent: the tiny world's reader)."""
    pickscore: PickScoreSettings | None = None
    """reward pickscore: where its CLIP model lives (required)."""
    remote: RemoteSettings | None = None
    """reward remote: the server and its metrics (required)."""

    @model_validator(mode="after")
    def _settings_match_reward(self):
        for name in C.REWARD_SETTINGS:
            if getattr(self, name) is not None and name != self.reward:
                raise ValueError(f"`{name}` settings given but reward is {self.reward!r}")
        if self.reward in C.NEEDS_SETTINGS and getattr(self, self.reward) is None:
            raise ValueError(f"reward {self.reward!r} needs its settings: add a `{self.reward}` mapping")
        return self

    @model_validator(mode="after")
    def _metric_exists(self):
        known = C.REWARD_METRICS[self.reward]
        if self.reward == "remote" and self.remote is not None:
            known = self.remote.metrics
        if known is not None and self.metric not in known:
            known = ", ".join(known)
            raise ValueError(f"reward {self.reward!r} has no metric {self.metric!r} (it has: {known})")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_settings(self, handler):
        """Unset reward settings are left out of the dump, so specs written before they existed keep their hash."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in C.REWARD_SETTINGS and v is None)}

    def reward_settings(self):
        """The settings of this task's reward (None for the tiny world's rewards)."""
        return getattr(self, self.reward) if self.reward in C.REWARD_SETTINGS else None


class Evaluation(MicroBatch, DecodeBatch):
    """Benchmarks: each task's prompts of one split, scored by its metric, for every seed. A sampling call holds 64
    prompts (tiny) or 8 (sd3); a micro_batch or decode_batch above that is the whole call."""

    benchmarks: tuple[Name, ...] | None = None
    """Tasks to evaluate, in report order; null or absent: all tasks, by name."""
    split: Literal["val", "test"] = "test"
    """Which prompt split the benchmarks score: `val` for tuning choices (sweeps), `test` for the report's tables and
    claims only (the report leaves `val` evaluations out)."""
    seeds: Annotated[tuple[Seed, ...], Field(min_length=1)] = (0, 1, 2)
    sampler: SamplerSettings = Field(default_factory=lambda: SamplerSettings(steps=20, noise_level=0.0))
    n_prompts: PositiveInt | None = None
    """Prompts per benchmark; null: the task's whole split."""
    grid_size: PositiveInt = 16
    """Images per sample grid in the report."""
    dtype: Literal[C.DTYPES] | None = None
    """The transformer's precision while it samples the benchmarks (no gradients); null: the model's own (tiny fp32,
    sd3 `model.dtype`). Tiny only: bf16 samples about 2x faster on a CPU with bf16 units, at 64 prompts per call."""

    _check_unique = field_validator("benchmarks", "seeds")(unique)

    @model_serializer(mode="wrap")
    def _omit_default_memory_settings(self, handler):  # replaces MemorySettings' serializer: does its work too
        """The memory settings at their defaults and split `test` are left out of the dump, so specs written before
        they existed keep their hash."""
        data = without_memory_defaults(handler(self))
        return {k: v for k, v in data.items() if not (k == "split" and v == "test")}

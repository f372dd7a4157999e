"""Experiment specs: pydantic models for the whole run, YAML loading with `extends`, and content hashes.

A spec is a YAML mapping validated into a frozen `Spec`. A file may start from another one with
`extends: ../flow_opd.yaml` (resolved against the extending file's folder): mappings merge recursively,
lists and scalars replace, and a mapping whose `kind` / `method` changes replaces the inherited one
(switching a cold start from merge to sft does not keep merge's fields). Training phases inherit the
top-level `sampler`, overriding only the keys they set. `spec_hash` is the sha256 of the canonical JSON of
the validated spec, so comments, key order, formatting and `extends` versus the same content written flat
all give one hash.

Every problem is one line, `file.yaml: dotted.field.path: message` (or `file.yaml:LINE:COL: message` for YAML
syntax), naming the file of the extends chain that set the offending value.
Imports: stdlib, pydantic, yaml only (the CLI must answer fast).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------- field types (strict: YAML `true` is not 1)
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
Float = Annotated[float, Field(strict=True)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
NonNegFloat = Annotated[float, Field(strict=True, ge=0)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1)]
Fraction = Annotated[float, Field(strict=True, gt=0, le=1)]  # in (0, 1]
Decay = Annotated[float, Field(strict=True, ge=0, lt=1)]  # in [0, 1)
Bool = Annotated[bool, Field(strict=True)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]  # task and teacher names
TinyTask = Literal["text", "objects", "quality"]  # the tiny world's prompt families

RESERVED = ("base", "error")  # router default / MAR anchor words, so never teacher names
# Metric keys each reward returns (the contract of flowopd.rewards); None: any key (remote scorers).
REWARD_METRICS: dict[str, tuple[str, ...] | None] = {
    "ocr": ("score", "exact"),
    "objects": ("score", "strict"),
    "quality": ("score", "content", "finish"),
    "pickscore": ("score",),
    "remote": None,
}
DISCRIMINATORS = ("kind", "method")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)

    @field_validator("*")
    @classmethod
    def _sorted_mappings(cls, value):
        """Mappings iterate in key order, so two specs with one hash also loop over tasks (etc.) alike."""
        return dict(sorted(value.items())) if isinstance(value, dict) else value


def _unique(values):
    if values is None:
        return values
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"repeated entries: {', '.join(map(str, repeated))}")
    return values


# ---------------------------------------------------------------- world and model
class World(Section):
    """The tiny synthetic world (flowopd.world.WorldConfig takes these as keyword arguments)."""

    canvas: PositiveInt = 32
    alphabet: Annotated[str, Field(min_length=2)] = "ACEHKOTX"
    word_length: PositiveInt = 2
    colours: Annotated[tuple[str, ...], Field(min_length=1)] = ("red", "green", "blue", "yellow")
    shapes: Annotated[tuple[str, ...], Field(min_length=1)] = ("circle", "square", "triangle")
    max_count: PositiveInt = 3
    relations: tuple[str, ...] = ("left of", "right of", "above", "below")
    jitter: bool = True
    """Random sizes and positions; false: every prompt has one canonical render (easier to learn in minutes)."""

    _check_unique = field_validator("alphabet", "colours", "shapes", "relations")(_unique)


class LoraSettings(Section):
    """LoRA adapters (peft) on the transformer's attention projections."""

    rank: PositiveInt = 32
    alpha: PositiveFloat = 64.0
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    dropout: Decay = 0.0


class TinyModel(Section):
    """Pixel-space SD3 transformer with a byte-level text encoder, trained from scratch in the base phase."""

    kind: Literal["tiny"]
    patch_size: PositiveInt = 4
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    head_dim: PositiveInt = 32
    text_dim: PositiveInt = 128
    text_layers: PositiveInt = 2
    max_text_len: PositiveInt = 64

    @model_validator(mode="after")
    def _heads_divide_text_dim(self):
        if self.text_dim % self.num_heads:
            raise ValueError(f"text_dim {self.text_dim} is not divisible by num_heads {self.num_heads}")
        return self


class SD3Model(Section):
    """Stable Diffusion 3(.5) from a local folder or a hub id."""

    kind: Literal["sd3"]
    pretrained: Annotated[str, Field(min_length=1)]
    revision: str | None = None
    resolution: PositiveInt = 512
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"
    lora: LoraSettings | None = Field(default_factory=LoraSettings)
    """Adapter every training phase uses unless the phase sets its own `lora`; null: train all weights."""

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, value):
        if value % 16:
            raise ValueError(f"must be a multiple of 16 (VAE factor 8 x patch 2), got {value}")
        return value


Model = Annotated[TinyModel | SD3Model, Field(discriminator="kind")]


# ---------------------------------------------------------------- base pretraining (tiny world only)
class BaseTraining(Section):
    """Flow-matching pretraining of the tiny base on deliberately flawed (prompt, render) pairs (not sd3)."""

    steps: PositiveInt = 1500
    batch_size: PositiveInt = 64
    dataset_size: PositiveInt = 16384
    """Training pairs rendered once before training."""
    lr: PositiveFloat = 1e-3
    warmup: NonNegInt = 100
    weight_decay: NonNegFloat = 0.0
    cfg_dropout: Probability = 0.1
    """Share of training prompts replaced by the empty prompt (for classifier-free guidance)."""
    label_noise: dict[TinyTask, Probability] = {"text": 0.5, "objects": 0.5, "quality": 0.0}
    """Per task: share of pairs whose render shows a wrong word / colour / count / relation."""
    bad_modes: dict[TinyTask, Probability] = {}
    """Per task: share of pairs rendered in the task's bad mode (flowopd.world.BAD_MODES: text on an inverted
    sign, one extra copy of the first object, a tinted render), so the base has a good and a bad mode."""
    bad_modes_from: NonNegInt | None = None
    """The step from which those pairs show their bad mode (before it, their clean render): the base first learns
    every skill, then a bad habit beside it. None: from the first step."""
    flaws: dict[Literal["noise", "blur"], Probability] = {"noise": 0.3, "blur": 0.2}
    """Share of renders degraded by each flaw (exclusive, so they sum to at most 1)."""
    task_mix: dict[TinyTask, NonNegFloat] = {"text": 0.4, "objects": 0.4, "quality": 0.2}
    """Relative share of each task's prompts among the training pairs."""
    ema_decay: Decay = 0.999
    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"

    @model_validator(mode="after")
    def _bad_modes_start_in_training(self):
        if self.bad_modes_from is not None and self.bad_modes_from >= self.steps:
            raise ValueError(f"bad_modes_from {self.bad_modes_from} must be below steps {self.steps}")
        return self

    @field_validator("flaws")
    @classmethod
    def _flaws_exclusive(cls, value):
        if sum(value.values()) > 1 + 1e-9:
            raise ValueError(f"flaw shares sum to {sum(value.values()):g} > 1")
        return value

    @field_validator("task_mix")
    @classmethod
    def _some_task(cls, value):
        if not any(value.values()):
            raise ValueError("needs at least one task with a positive share")
        return value


class SamplerSettings(Section):
    """Flow-GRPO SDE sampler over SD3's shifted sigma grid; noise_level 0 is the deterministic ODE (Euler)."""

    steps: PositiveInt = 10
    shift: PositiveFloat = 3.0
    noise_level: NonNegFloat = 0.7
    """a in sd(s) = a sqrt(s / (1 - s))."""
    cfg: NonNegFloat = 3.0
    """Classifier-free guidance scale g in v = v_u + g (v_c - v_u); 1 disables guidance."""
    logprob_reduction: Literal["mean", "sum"] = "mean"
    """How a step's Gaussian log-density reduces over elements (Flow-GRPO: mean)."""
    sde: Literal["flow", "cps"] = "flow"
    """The stochastic step: "flow" (Flow-GRPO's SDE, noise_level = a) or "cps" (coefficients-preserving: every state
    at its scheduled noise level, no noise on the last step; noise_level = eta in (0, 1])."""
    sde_window: tuple[NonNegInt, PositiveInt] | None = None
    """[start, end): only these steps draw noise (and are trained, GRPO); the others are the ODE (Flow-GRPO-Fast)."""

    @model_validator(mode="after")
    def _sde_options(self):
        if self.sde == "cps" and not 0 < self.noise_level <= 1:
            raise ValueError(f"sde cps needs noise_level (eta) in (0, 1], got {self.noise_level:g}")
        if self.sde_window is not None:
            start, end = self.sde_window
            if self.noise_level <= 0:
                raise ValueError("sde_window needs noise_level > 0 (with 0 every step is the ODE)")
            if not start < end <= self.steps:
                raise ValueError(f"sde_window [{start}, {end}) must lie inside the sampler's {self.steps} steps "
                                 f"with start < end")
        return self


# ---------------------------------------------------------------- tasks
class TinyPrompts(Section):
    """Prompts drawn from the tiny world's grammar (train and test splits are disjoint)."""

    kind: Literal["tiny"]
    task: TinyTask
    n_train: PositiveInt = 256
    n_test: PositiveInt = 64


class FilePrompts(Section):
    """Prompts read from files (paths relative to the repository root)."""

    kind: Literal["file"]
    train: Annotated[str, Field(min_length=1)]
    test: Annotated[str, Field(min_length=1)]
    format: Literal["lines", "geneval_jsonl"] = "lines"


PromptSource = Annotated[TinyPrompts | FilePrompts, Field(discriminator="kind")]


# ---------------------------------------------------------------- reward settings (GPU-scale scorers)
class OCRSettings(Section):
    """Tesseract on generated images of any size (SD3 scale): the greyscale image as is, Tesseract's own
    binarisation, target = the prompt's first double-quoted span (Flow-GRPO's OCR prompts: 'A sign that says "..."').
    Absent: the tiny world's reader (binarised ink, upscaled, the world's alphabet as whitelist)."""

    page_mode: Literal["auto", "sparse_text", "single_block", "single_line"] = "auto"
    """Tesseract page segmentation (auto: full layout analysis; sparse_text missed large text on a sign here)."""
    whitelist: Annotated[str, Field(min_length=1)] | None = None
    """Characters Tesseract may read; null: any."""


class PickScoreSettings(Section):
    """PickScore (Kirstain et al. 2023): a CLIP fine-tuned on Pick-a-Pic human preferences;
    score = logit_scale * cos(image embedding, text embedding); SD3.5-M scores about 21.6 (the paper divides by 26)."""

    model: Annotated[str, Field(min_length=1)]
    """Folder of the transformers CLIPModel (yuvalkirstain/PickScore_v1 downloaded), or a hub id when online."""
    processor: Annotated[str, Field(min_length=1)] | None = None
    """Folder of its CLIPProcessor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); null: the model folder."""
    batch_size: PositiveInt = 32
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


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

    _check_unique = field_validator("metrics")(_unique)

    @field_validator("metrics")
    @classmethod
    def _has_score(cls, value):
        if "score" not in value:
            raise ValueError('must include "score" (the key the trainers optimise)')
        return value


REWARD_SETTINGS = ("ocr", "pickscore", "remote")  # Task fields: settings of the reward of the same name
NEEDS_SETTINGS = ("pickscore", "remote")  # rewards that cannot run without their settings
TINY_WORLD_REWARDS = ("objects", "quality")  # score the tiny world's palette renders only


class Task(Section):
    """A prompt set with its reward; its benchmark is the test split scored by `metric`."""

    prompts: PromptSource
    reward: Literal["ocr", "objects", "quality", "pickscore", "remote"]
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
        for name in REWARD_SETTINGS:
            if getattr(self, name) is not None and name != self.reward:
                raise ValueError(f"`{name}` settings given but reward is {self.reward!r}")
        if self.reward in NEEDS_SETTINGS and getattr(self, self.reward) is None:
            raise ValueError(f"reward {self.reward!r} needs its settings: add a `{self.reward}` mapping")
        return self

    @model_validator(mode="after")
    def _metric_exists(self):
        known = REWARD_METRICS[self.reward]
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
        return {k: v for k, v in data.items() if not (k in REWARD_SETTINGS and v is None)}

    def reward_settings(self):
        """The settings of this task's reward (None for the tiny world's rewards)."""
        return getattr(self, self.reward) if self.reward in REWARD_SETTINGS else None


# ---------------------------------------------------------------- training phases
class EmaSettings(Section):
    """EMA of the trained weights, what gets evaluated and saved (Flow-GRPO: 0.9 every 8 steps)."""

    decay: Decay = 0.9
    every: PositiveInt = 8


class GRPOSettings(Section):
    """Flow-GRPO: group-relative advantages, PPO-clip, KL to the frozen base (method.md section 2)."""

    group_size: Annotated[int, Field(strict=True, ge=2)] = 8
    prompts_per_step: PositiveInt = 4
    steps: PositiveInt = 150
    lr: PositiveFloat = 3e-4
    clip_eps: PositiveFloat = 1e-4
    beta: NonNegFloat = 0.04
    """Weight of KL(policy step || base step)."""
    adv_std: Literal["group", "global"] = "group"
    """Advantage denominator: std over the group, or over all rewards of the step."""
    adv_clip: PositiveFloat = 5.0
    timestep_fraction: Fraction = 1.0
    """Share of the (trainable) sampler steps trained per rollout."""
    inner_epochs: PositiveInt = 1
    grad_clip: PositiveFloat | None = 1.0
    cfg_train: Bool = True
    """Train on the guided velocity (the rollout policy) rather than the conditional one."""
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    ema: EmaSettings | None = Field(default_factory=EmaSettings)
    lora: LoraSettings | None = None
    """Adapter to train; null: the model's lora (sd3) or all weights (tiny)."""
    checkpoint_every: PositiveInt = 50


class GRPOMethod(GRPOSettings):
    """Flow-GRPO (flowopd/grpo.py): the paper's teacher trainer."""

    kind: Literal["grpo"]


class NFTMethod(Section):
    """DiffusionNFT (flowopd/nft.py): flow matching on the policy's own samples, good ones against bad ones."""

    kind: Literal["nft"]
    group_size: Annotated[int, Field(strict=True, ge=2)] = 8
    prompts_per_step: PositiveInt = 4
    steps: PositiveInt = 100
    lr: PositiveFloat = 1e-4
    beta: PositiveFloat = 1.0
    """Strength of the implicit policies v+- = v_old +- beta (v - v_old); the trust region is ~1 / beta."""
    kl_beta: NonNegFloat = 0.0
    """Weight of ||v - v_ref||^2, the velocity-space KL to the frozen starting model."""
    adv_std: Literal["group", "global"] = "group"
    adv_clip: PositiveFloat = 1.0
    """Advantages clipped to +-adv_clip, then mapped onto the optimality r = A / (2 adv_clip) + 1/2 in [0, 1]."""
    train_times: PositiveInt = 4
    """Noise levels (each with fresh noise) per sample and optimizer step."""
    time_fraction: Fraction = 1.0
    """Noise levels are drawn from the first (noisiest) share of the sampler's grid."""
    old_decay: Decay = 0.0
    """EMA decay of the sampling policy v_old towards the trained weights after each step (0: the last weights)."""
    inner_epochs: PositiveInt = 1
    grad_clip: PositiveFloat | None = 1.0
    cfg_train: Bool = True
    """Train the guided velocity (unconditional branch detached) and sample at the sampler's cfg; false: the
    conditional velocity, sampled at cfg 1."""
    sampler: SamplerSettings = Field(default_factory=lambda: SamplerSettings(noise_level=0.0))
    ema: EmaSettings | None = Field(default_factory=EmaSettings)
    lora: LoraSettings | None = None
    """Adapter to train; null: the model's lora (sd3) or all weights (tiny)."""
    checkpoint_every: PositiveInt = 50

    @field_validator("sampler")
    @classmethod
    def _no_sde_window(cls, value):
        if value.sde_window is not None:
            raise ValueError("nft trains on the rollouts' final samples, not on their steps: an sde_window (a GRPO "
                             "option) does nothing here; remove it")
        return value


TeacherMethod = Annotated[GRPOMethod | NFTMethod, Field(discriminator="kind")]


class Teacher(Section):
    """A task teacher: a single-reward trainer (method.kind) on one task's train prompts, from the base."""

    task: Name
    method: TeacherMethod = Field(default_factory=lambda: GRPOMethod(kind="grpo"))
    """The trainer (`kind: grpo | nft`) and its settings; default Flow-GRPO."""


class Baseline(Section):
    """Mixed-reward training, one policy on all tasks: the seesaw baseline Flow-OPD must beat. Give it the
    teachers' method so the comparison is fair."""

    weights: Annotated[dict[Name, NonNegFloat], Field(min_length=1)]
    """Per task: weight of its reward in the sum."""
    advantage: Literal["joint", "per_reward"] = "joint"
    """joint: normalise the weighted reward sum; per_reward: normalise each reward's advantage, then sum."""
    method: TeacherMethod = Field(default_factory=lambda: GRPOMethod(kind="grpo"))
    """The trainer and its settings; give it the teachers' method."""


class RouterRule(Section):
    """Hard routing: a prompt matching this rule is distilled from `teacher`. Exactly one matcher per rule."""

    teacher: Name
    task: Name | None = None
    """Match prompts of this task (their dataset of origin)."""
    keywords: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)] | None = None
    """Match prompts containing any of these words (case-insensitive)."""
    regex: Annotated[str, Field(min_length=1)] | None = None
    """Match prompts where this Python regular expression is found."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value):
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"invalid regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def _one_matcher(self):
        given = [m for m in ("task", "keywords", "regex") if getattr(self, m) is not None]
        if len(given) != 1:
            given = ", ".join(given) or "none"
            raise ValueError(f"a rule needs exactly one of task, keywords, regex (got {given})")
        return self


class Router(Section):
    """Rules tried in order; `default` (a teacher, "base" or "error") takes prompts no rule matches."""

    rules: tuple[RouterRule, ...] = ()
    default: str = "error"


class MergeColdStart(Section):
    """Student = merge of the teachers (linear: weights normalised to sum 1; task arithmetic / TIES: base +
    scale * sum_k w_k (theta_k - base))."""

    method: Literal["merge"]
    mode: Literal["linear", "task_arithmetic", "ties"] = "linear"
    weights: Annotated[dict[Name, NonNegFloat], Field(min_length=1)]
    """Per teacher, all teachers named."""
    lora_merge: Literal["product", "factors"] = "product"
    """LoRA teachers: merge the products B A (correct) or the factors A, B separately (reference code)."""
    ties_density: Fraction = 0.2
    scale: PositiveFloat = 1.0


class SFTColdStart(Section):
    """Student = base fine-tuned by flow matching on samples each teacher draws for its routed prompts."""

    method: Literal["sft"]
    steps: PositiveInt = 200
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-4
    samples_per_prompt: PositiveInt = 4
    best_of_group: Bool = False
    """Keep only each prompt's best-reward sample."""
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    lora: LoraSettings | None = None


class NoColdStart(Section):
    """Student = the base model."""

    method: Literal["none"]


ColdStart = Annotated[MergeColdStart | SFTColdStart | NoColdStart, Field(discriminator="method")]


class QuerySettings(Section):
    """Where velocity_mse queries the routed teacher: one state per rollout, its sampler step drawn per sample."""

    steps: tuple[NonNegInt, NonNegInt] | None = None
    """[first, last] sampler steps to draw from (inclusive; 0 is pure noise, steps - 1 the last state before the
    sample); null: the low-noise half [steps // 2, steps - 1] (DiffusionOPSD's DanceOPD run)."""
    draw: Literal["uniform", "beta"] = "uniform"
    """uniform over the range, or beta: u ~ Beta(5, 2) mapped onto it, biased to its low-noise end (DanceOPD's
    default over the whole trajectory)."""

    @field_validator("steps")
    @classmethod
    def _ordered(cls, value):
        if value is not None and value[0] > value[1]:
            raise ValueError(f"first step {value[0]} is after last step {value[1]}")
        return value


class OPDSettings(Section):
    """Multi-teacher on-policy distillation: the routed teacher's step at the student's own states."""

    estimator: Literal["sampled", "analytic", "analytic_grad", "diffusion_opd", "velocity_mse"] = "sampled"
    """How the per-step distance to the teacher trains the student (flowopd/opd.py, README "estimators"). PPO on a
    per-step reward: sampled (log p_teacher - log p_student at the student's x'), analytic (-KL in closed form,
    detached). Differentiated: analytic_grad (the closed-form step KL, GKD-style: DiffusionOPD's objective on SDE
    rollouts), diffusion_opd (DiffusionOPD's code: ||mu_S - mu_T||^2 / 2 on ODE rollouts, / (2 a^2 s / (1 - s)) on
    the SDE), velocity_mse (DanceOPD: ||v_S - v_T||^2 at one low-noise state per rollout, see `query`). The first
    three need the SDE sampler (noise_level > 0); the last two also take the ODE (noise_level 0)."""
    credit: Literal["step", "element"] = "step"
    """step: one reward per sample and trained step, advantage of the step's log-prob (the paper's); element: each
    latent element's log-ratio is the advantage of that element's log-prob (per-token OPD with the elements as
    tokens): the same expected gradient without the other elements' noise. Only sampled and analytic have a reward
    to credit."""
    query: QuerySettings | None = None
    """velocity_mse only: which state of each rollout is queried; null: QuerySettings' defaults."""
    reward_to_go: Bool = False
    normalize_advantage: Bool = False
    clip_eps: PositiveFloat = 1e-4
    group_size: PositiveInt = 8
    prompts_per_step: PositiveInt = 4
    steps: PositiveInt = 200
    lr: PositiveFloat = 3e-4
    timestep_fraction: Fraction = 1.0
    inner_epochs: PositiveInt = 1
    grad_clip: PositiveFloat | None = 1.0
    cfg_train: Bool = True
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    ema: EmaSettings | None = Field(default_factory=EmaSettings)
    lora: LoraSettings | None = None
    checkpoint_every: PositiveInt = 50

    @model_validator(mode="after")
    def _element_credit_has_no_reward_to_go(self):
        if self.credit == "element" and self.reward_to_go:
            raise ValueError("reward_to_go sums whole steps' rewards: it needs credit: step (credit: element "
                             "rewards each element with its own log-ratio)")
        return self

    @model_validator(mode="after")
    def _flow_sde_only(self):
        if self.sampler.sde != "flow" or self.sampler.sde_window is not None:
            raise ValueError("OPD's step rewards and KLs are written for the flow SDE on every step: sampler.sde "
                             "must be flow and sampler.sde_window unset (cps and windows are teacher options)")
        return self

    @model_validator(mode="after")
    def _estimator_fits_the_sampler(self):
        if self.estimator in ("sampled", "analytic", "analytic_grad") and self.sampler.noise_level == 0:
            raise ValueError(f"estimator {self.estimator} needs the SDE sampler (sampler.noise_level > 0) for its "
                             "Gaussian steps; on the ODE use diffusion_opd or velocity_mse")
        if self.query is not None:
            if self.estimator != "velocity_mse":
                raise ValueError(f"query applies to estimator velocity_mse, not {self.estimator}")
            if self.query.steps is not None and self.query.steps[1] >= self.sampler.steps:
                raise ValueError(f"query.steps {list(self.query.steps)} reaches past the sampler's last step "
                                 f"{self.sampler.steps - 1}")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_query(self, handler):
        """An unset query is left out of the dump, so specs written before it existed keep their hash."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "query" and v is None)}


class MARSettings(Section):
    """Manifold Anchor Regularisation: loss += weight * KL(student step || anchor step)."""

    anchor: str = "base"
    """A teacher name (the aesthetic / quality teacher) or "base"."""
    weight: NonNegFloat = 0.02
    """lambda; 0 turns MAR off."""


class Evaluation(Section):
    """Benchmarks: each task's test prompts, scored by its metric, for every seed."""

    benchmarks: tuple[Name, ...] | None = None
    """Tasks to evaluate, in report order; null or absent: all tasks, by name."""
    seeds: Annotated[tuple[NonNegInt, ...], Field(min_length=1)] = (0, 1, 2)
    sampler: SamplerSettings = Field(default_factory=lambda: SamplerSettings(steps=20, noise_level=0.0))
    n_prompts: PositiveInt | None = None
    """Prompts per benchmark; null: the task's whole test set."""
    grid_size: PositiveInt = 16
    """Images per sample grid in the report."""

    _check_unique = field_validator("benchmarks", "seeds")(_unique)


# ---------------------------------------------------------------- the spec
class Spec(Section):
    """A whole Flow-OPD experiment: world, model, base, tasks, teachers, baseline, cold start, OPD, eval."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    label: str | None = None
    """Row label in the report (e.g. "flow_opd:no_mar"); absent: the name."""
    description: str = ""
    seed: NonNegInt = 0
    world: World = Field(default_factory=World)
    model: Model = Field(default_factory=lambda: TinyModel(kind="tiny"))
    base: BaseTraining = Field(default_factory=BaseTraining)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    """Rollout sampler of the training phases; each inherits it, overriding only the keys it sets."""
    tasks: Annotated[dict[Name, Task], Field(min_length=1)]
    teachers: Annotated[dict[Name, Teacher], Field(min_length=1)]
    baseline: Baseline | None = None
    router: Router
    cold_start: ColdStart
    opd: OPDSettings = Field(default_factory=OPDSettings)
    mar: MARSettings = Field(default_factory=MARSettings)
    evaluation: Evaluation = Field(default_factory=Evaluation)

    @model_validator(mode="before")
    @classmethod
    def _fill_derived_defaults(cls, data):
        """label <- name; phase samplers <- top-level sampler + own keys; evaluation.benchmarks <- tasks."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("label") is None and isinstance(data.get("name"), str):
            data["label"] = data["name"]
        if isinstance(data.get("tasks"), dict) and isinstance(data.get("evaluation", {}), dict):
            evaluation = dict(data.get("evaluation") or {})
            if evaluation.get("benchmarks") is None:
                evaluation["benchmarks"] = sorted(data["tasks"])
            data["evaluation"] = evaluation
        top = data.get("sampler", {})
        try:
            top = top if isinstance(top, SamplerSettings) else SamplerSettings.model_validate(top)
            top = top.model_dump()
        except ValidationError:
            return data  # reported once, at `sampler`, not again in every phase

        def inherit(section, key="sampler"):
            if section is None or not isinstance(section, dict):
                return section
            own = section.get(key, {})
            return {**section, key: deep_merge(top, own) if isinstance(own, dict) else own}

        def inherit_method(section):  # nft samples the ODE unless its sampler says otherwise
            if not isinstance(section, dict):
                return section
            method = section.get("method", {"kind": "grpo"})
            if not isinstance(method, dict) or not isinstance(method.get("sampler", {}), dict):
                return section
            own = dict(method.get("sampler", {}))
            if method.get("kind") == "nft":
                own.setdefault("noise_level", 0.0)
            return {**section, "method": {**method, "sampler": deep_merge(top, own)}}

        if isinstance(data.get("teachers"), dict):
            data["teachers"] = {name: inherit_method(t) for name, t in data["teachers"].items()}
        if isinstance(data.get("baseline"), dict):
            data["baseline"] = inherit_method(data["baseline"])
        if isinstance(data.get("cold_start"), dict) and data["cold_start"].get("method") == "sft":
            data["cold_start"] = inherit(data["cold_start"])
        data["opd"] = inherit(data.get("opd", {}))
        return data

    @model_validator(mode="after")
    def _cross_field_checks(self):
        problems = cross_field_problems(self)
        if problems:
            summary = "; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in problems)
            raise PydanticCustomError("spec_checks", "{summary}", {"summary": summary, "problems": problems})
        return self

    def sections(self, *names: str) -> dict:
        """The named top-level sections as JSON-ready data: the sub-spec a phase depends on."""
        if not names:
            raise ValueError("name at least one section")
        unknown = [n for n in names if n not in type(self).model_fields]
        if unknown:
            raise KeyError(f"unknown sections {unknown}; sections: {', '.join(type(self).model_fields)}")
        return self.model_dump(mode="json", include=set(names))

    def section_hash(self, *names: str) -> str:
        """sha256 of the canonical JSON of {name: section}: keys a phase's outputs on what it reads."""
        return _sha256(self.sections(*names))


def cross_field_problems(spec: Spec) -> list[tuple[tuple, str]]:
    """Checks that span sections, as (loc, message); names must refer to defined tasks and teachers."""
    tasks, teachers = list(spec.tasks), list(spec.teachers)
    problems = []

    def expect(ok, loc, msg):
        if not ok:
            problems.append((loc, msg))

    def one_of(names):
        return ", ".join(repr(n) for n in dict.fromkeys(names))

    if isinstance(spec.model, TinyModel):
        expect(spec.world.canvas % spec.model.patch_size == 0, ("model", "patch_size"),
               f"patch_size {spec.model.patch_size} does not divide world.canvas {spec.world.canvas}")
    for name, task in spec.tasks.items():
        tiny_prompts = isinstance(task.prompts, TinyPrompts)
        if isinstance(spec.model, SD3Model):
            expect(task.reward not in TINY_WORLD_REWARDS, ("tasks", name, "reward"),
                   f"reward {task.reward!r} scores the tiny world's renders; an sd3 spec uses ocr, pickscore or remote")
        expect(task.reward != "objects" or tiny_prompts, ("tasks", name, "reward"),
               "reward 'objects' needs the tiny world's structured prompts (prompts.kind tiny)")
        if task.reward == "ocr" and task.ocr is None:
            expect(tiny_prompts and isinstance(spec.model, TinyModel), ("tasks", name, "ocr"),
                   "the tiny world's OCR reader reads only tiny renders of tiny prompts; "
                   "add `ocr: {}` for the scene reader")
    for name, teacher in spec.teachers.items():
        expect(name not in RESERVED, ("teachers", name),
               f"{name!r} is reserved (router.default and mar.anchor give it a meaning)")
        expect(teacher.task in tasks, ("teachers", name, "task"),
               f"unknown task {teacher.task!r}; defined: {one_of(tasks)}")
    if spec.baseline is not None:
        for task in spec.baseline.weights:
            expect(task in tasks, ("baseline", "weights", task),
                   f"unknown task {task!r}; defined: {one_of(tasks)}")
        expect(any(spec.baseline.weights.values()), ("baseline", "weights"), "all weights are zero")
    for i, rule in enumerate(spec.router.rules):
        expect(rule.teacher in teachers, ("router", "rules", i, "teacher"),
               f"unknown teacher {rule.teacher!r}; defined: {one_of(teachers)}")
        if rule.task is not None:
            expect(rule.task in tasks, ("router", "rules", i, "task"),
                   f"unknown task {rule.task!r}; defined: {one_of(tasks)}")
    default = spec.router.default
    expect(default in teachers or default in RESERVED, ("router", "default"),
           f"unknown teacher {default!r}; expected one of {one_of(teachers + list(RESERVED))}")
    if default == "error":
        if not spec.router.rules:
            problems.append((("router", "rules"), 'no rules and default "error": no prompt can be routed'))
        elif all(rule.task is not None for rule in spec.router.rules):
            routed = {rule.task for rule in spec.router.rules}
            for task in dict.fromkeys(t.task for t in spec.teachers.values()):
                expect(task in routed, ("router", "rules"),
                       f'task {task!r} matches no rule and default is "error"')
    expect(spec.mar.anchor in teachers or spec.mar.anchor == "base", ("mar", "anchor"),
           f"unknown anchor {spec.mar.anchor!r}; expected one of {one_of(teachers + ['base'])}")
    if isinstance(spec.cold_start, MergeColdStart):
        weights = spec.cold_start.weights
        for name in weights:
            expect(name in teachers, ("cold_start", "weights", name),
                   f"unknown teacher {name!r}; defined: {one_of(teachers)}")
        missing = [t for t in teachers if t not in weights]
        expect(not missing, ("cold_start", "weights"), f"no weight for teachers {one_of(missing)}")
        expect(any(weights.values()), ("cold_start", "weights"), "all weights are zero")
    for i, task in enumerate(spec.evaluation.benchmarks or ()):
        expect(task in tasks, ("evaluation", "benchmarks", i),
               f"unknown task {task!r}; defined: {one_of(tasks)}")
    n = spec.evaluation.n_prompts
    for name in spec.evaluation.benchmarks or ():
        prompts = spec.tasks[name].prompts if name in spec.tasks else None
        if n is not None and isinstance(prompts, TinyPrompts):
            expect(n <= prompts.n_test, ("evaluation", "n_prompts"),
                   f"{n} exceeds the test set of task {name!r} (n_test {prompts.n_test})")
    return problems


# ---------------------------------------------------------------- hashing
def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def spec_hash(spec: Spec) -> str:
    """sha256 of the canonical JSON of the validated spec (defaults filled, `extends` resolved)."""
    return _sha256(spec.model_dump(mode="json"))


# ---------------------------------------------------------------- errors
class SpecError(Exception):
    """One or more problems with a spec, each a one-line string `file: dotted.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _dotted(loc) -> str:
    return ".".join(str(part) for part in loc)


def _display(path: str | os.PathLike) -> str:
    """Path as shown in messages: relative to the working directory when inside it."""
    path = os.path.normpath(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop discriminated-union tags from a pydantic loc, walking the input it describes."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and part in [node.get(d) for d in DISCRIMINATORS]:
            continue
        out.append(part)
        has_key = isinstance(node, dict) and part in node
        has_index = isinstance(node, list | tuple) and isinstance(part, int) and part < len(node)
        node = node[part] if has_key or has_index else None
    return tuple(out)


def _unwrap(tp):
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _child_type(tp, part):
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part)
        return field.annotation if field else None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):  # discriminated union: `part` is the tag
        for member in map(_unwrap, typing.get_args(tp)):
            tags = [typing.get_args(_unwrap(member.model_fields[d].annotation))
                    for d in DISCRIMINATORS if isinstance(member, type) and d in member.model_fields]
            if tags and part in tags[0]:
                return member
        return None
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin in (tuple, list):
        return typing.get_args(tp)[0]
    return None


def _allowed_fields(loc: tuple) -> list[str]:
    tp = Spec
    for part in loc:
        tp = _child_type(tp, part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _message(err: dict) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        hint = f"; did you mean {close[0]!r}?" if close else hint
        return f"unknown field {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required field missing"
    if kind == "union_tag_not_found":
        return f"needs {err['ctx']['discriminator']} to choose a variant"
    if kind == "union_tag_invalid":
        ctx = err["ctx"]
        return f"unknown {ctx['discriminator']} {ctx['tag']!r}; expected one of {ctx['expected_tags']}"
    if kind in ("value_error", "assertion_error"):
        return err["msg"].split(", ", 1)[-1]  # drop pydantic's "Value error, " prefix
    message = err["msg"]
    value = err.get("input")
    if isinstance(value, str | int | float | bool):
        message += f" (got {value!r})"
    return message


class _Origins:
    """Which file of the extends chain set each path of the merged data (the last writer wins)."""

    def __init__(self, default: str):
        self.default, self.by_loc, self.writes = default, {}, 0

    def record(self, data: Any, file: str, prefix: tuple = ()):
        self.writes += 1
        self.by_loc[prefix] = (self.writes, file)
        if isinstance(data, dict):
            for key, value in data.items():
                self.record(value, file, (*prefix, key))

    def forget(self, prefix: tuple):
        for loc in [loc for loc in self.by_loc if loc[: len(prefix)] == prefix]:
            del self.by_loc[loc]

    def file_of(self, loc: tuple) -> str:
        """The last file to write loc or anything inside it (a section's check blames its latest edit)."""
        inside = [written for at, written in self.by_loc.items() if at[: len(loc)] == loc]
        if inside:
            return max(inside)[1]
        for end in range(len(loc) - 1, -1, -1):
            if loc[:end] in self.by_loc:
                return self.by_loc[loc[:end]][1]
        return self.default


def _problems_from(err: ValidationError, data: dict, origins: _Origins) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        if e["type"] == "spec_checks":
            found = [(tuple(loc), msg) for loc, msg in e["ctx"]["problems"]]
        else:
            found = [(_clean_loc(e["loc"], data), _message(e))]
        for loc, msg in found:
            where = f"{_dotted(loc)}: " if loc else ""
            lines.append(f"{origins.file_of(loc)}: {where}{msg}")
    return list(dict.fromkeys(lines))


# ---------------------------------------------------------------- YAML: safe, duplicate keys refused
class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-3 as a float (YAML 1.1 wants 1.0e-3)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: str) -> Any:
    shown = _display(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{shown}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([f"{shown}: cannot read: {getattr(err, 'strerror', None) or err}"]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        if mark is None:
            raise SpecError([f"{shown}: {err}"]) from None
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.problem and err.context_mark and err.context_mark.line != mark.line:
            problem += f" ({err.context} at line {err.context_mark.line + 1})"
        raise SpecError([f"{shown}:{mark.line + 1}:{mark.column + 1}: {problem}"]) from None
    except yaml.YAMLError as err:
        raise SpecError([f"{shown}: {err}"]) from None


# ---------------------------------------------------------------- extends
def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge recursively; lists and scalars replace, and so does a mapping whose kind changes."""
    out = dict(base)
    for key, value in override.items():
        if _merges(out.get(key), value):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _merges(base: Any, override: Any) -> bool:
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return False
    return all(d not in override or d not in base or override[d] == base[d]
               or isinstance(override[d], dict)  # a teacher's `method` section, not a discriminator's value
               for d in DISCRIMINATORS)


def _merge_tracked(base: dict, override: dict, file: str, origins: _Origins, prefix: tuple = ()) -> dict:
    out = dict(base)
    for key, value in override.items():
        loc = (*prefix, key)
        if _merges(out.get(key), value):
            out[key] = _merge_tracked(out[key], value, file, origins, loc)
        else:
            origins.forget(loc)
            origins.record(value, file, loc)
            out[key] = value
    return out


def extends_chain(path: str | os.PathLike) -> list[tuple[Path, dict]]:
    """The files a spec is built from, root first: (path, that file's own mapping without `extends`)."""
    path, chain, seen = os.path.normpath(path), [], []
    while True:
        shown, real = _display(path), os.path.realpath(path)
        if real in seen:
            cycle = " -> ".join(_display(p) for p in (*seen[seen.index(real):], real))
            raise SpecError([f"{_display(chain[0][0])}: extends cycle: {cycle}"])
        seen.append(real)
        data = _read_yaml(path)
        if not isinstance(data, dict):
            got = "an empty file" if data is None else f"a {type(data).__name__}"
            raise SpecError([f"{shown}: a spec must be a YAML mapping, got {got}"])
        data = dict(data)
        parent = data.pop("extends", None)
        chain.append((Path(path), data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise SpecError([f"{shown}: extends: must be a path to another spec file, got {parent!r}"])
        path = os.path.normpath(os.path.join(os.path.dirname(path), parent))
        if not os.path.exists(path):
            raise SpecError([f"{shown}: extends: file not found: {_display(path)}"])


def _resolve(path: str | os.PathLike) -> tuple[dict, _Origins]:
    """Merge the chain root first, remembering which file set each value."""
    chain = extends_chain(path)
    leaf = _display(chain[-1][0])
    merged, origins = {}, _Origins(leaf)
    for file, data in chain:
        merged = _merge_tracked(merged, data, _display(file), origins)
    origins.by_loc[()] = leaf
    return merged, origins


def resolve_raw(path: str | os.PathLike) -> dict:
    """The merged mapping of a spec file and its `extends` chain, before validation."""
    return _resolve(path)[0]


def validate_spec(data: dict, source: str = "<spec>") -> Spec:
    """Validate a raw mapping into a Spec, raising SpecError with one line per problem."""
    return _validate(data, _Origins(source))


def _validate(data: dict, origins: _Origins) -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems_from(err, data, origins)) from None


def load_spec(path: str | os.PathLike) -> Spec:
    """Read, resolve `extends`, validate. Raises SpecError (one line per problem) on any bad input."""
    data, origins = _resolve(path)
    return _validate(data, origins)


def load_spec_or_exit(path: str | os.PathLike) -> Spec:
    """load_spec for command lines: the problems, one per line, as the exit message (no traceback)."""
    try:
        return load_spec(path)
    except SpecError as error:
        raise SystemExit(str(error)) from None


def json_schema() -> dict:
    """JSON Schema for editors. `required` is kept only for kind / method, so partial files that use `extends`
    validate too; `flowopd spec validate` checks the rest."""
    schema = Spec.model_json_schema()

    def relax(node):
        if isinstance(node, dict):
            if isinstance(node.get("required"), list):
                kept = [r for r in node["required"] if r in DISCRIMINATORS]
                if kept:
                    node["required"] = kept
                else:
                    del node["required"]
            for value in node.values():
                relax(value)
        elif isinstance(node, list):
            for value in node:
                relax(value)

    relax(schema)
    schema["properties"] = {
        "extends": {"type": "string", "description": "Path of a spec this one starts from (relative to this "
                    "file's folder); mappings merge, lists and scalars replace."},
        **schema["properties"],
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}

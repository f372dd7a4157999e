"""The model sections: the tiny pixel-space model or SD3 (with LoRA), the tiny base's pretraining, the sampler."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from flowopd.spec import choices as C
from flowopd.spec.fields import (
    Decay,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Section,
    SpecPath,
    TinyTask,
)


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
    pretrained: SpecPath
    revision: str | None = None
    resolution: PositiveInt = 512
    dtype: Literal[C.DTYPES] = "bf16"
    lora: LoraSettings | None = Field(default_factory=LoraSettings)
    """Adapter every training phase uses unless the phase sets its own `lora`; null: train all weights."""
    max_sequence_length: Annotated[int, Field(ge=1, le=512)] = 256
    """T5 tokens per prompt (diffusers' default 256; Flow-GRPO and its released LoRAs: 128)."""
    vae_dtype: Literal[C.DTYPES] | None = None
    """The VAE's precision; null: the model's `dtype` (Flow-GRPO and diffusers' LoRA scripts decode in fp32)."""

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
    flaws: dict[Literal[C.FLAWS], Probability] = {"noise": 0.3, "blur": 0.2}
    """Share of renders degraded by each flaw (exclusive, so they sum to at most 1)."""
    task_mix: dict[TinyTask, NonNegFloat] = {"text": 0.4, "objects": 0.4, "quality": 0.2}
    """Relative share of each task's prompts among the training pairs."""
    content: Literal["train", "all"] = "train"
    """The content the base is pretrained on: the training split's only (validation and test content unseen by every
    phase), or all of the world's (as a web-scale model has seen the kind of image every prompt asks for)."""
    ema_decay: Decay = 0.999
    time_sampling: Literal[C.TIME_SAMPLINGS] = "logit_normal"

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
    logprob_reduction: Literal[C.LOGPROB_REDUCTIONS] = "mean"
    """How a step's Gaussian log-density reduces over elements (Flow-GRPO: mean)."""
    sde: Literal[C.SDE_KINDS] = "flow"
    """The stochastic step: "flow" (Flow-GRPO's SDE, noise_level = a) or "cps" (coefficients-preserving: every state
    at its scheduled noise level, no noise on the last step; noise_level = eta in (0, 1])."""
    sde_window: tuple[NonNegInt, PositiveInt] | None = None
    """[start, end): only these steps draw noise (and are trained, GRPO); the others are the ODE (Flow-GRPO-Fast)."""
    kl_form: Literal[C.KL_FORMS] = "step"
    """The KL terms (GRPO's beta KL to the reference, OPD's MAR): "step", the exact KL between the two Gaussian steps,
    or "flow_grpo", Flow-GRPO's ||mu - mu_ref||^2 / (2 sd(s)^2) = KL (s - s'), 3.7-25x weaker at the same beta on a
    10-step shift-3 grid (docs/method.md#teachers-flow-grpo)."""
    uncond_grad: bool = True
    """Training differentiates through the unconditional CFG branch too; false: it is detached, as in Flow-GRPO's SD3
    training (the shared unconditional model then moves only through what every prompt shares)."""

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

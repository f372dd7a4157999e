"""The training sections: teachers and the mixed baseline (GRPO or NFT), the router, the cold start, OPD and MAR."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from flowopd.spec import choices as C
from flowopd.spec.fields import (
    INT_MAX,
    Bool,
    Decay,
    Float,
    Fraction,
    GradientCheckpointing,
    MicroBatch,
    Name,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Section,
    TrainingMemory,
    without_memory_defaults,
)
from flowopd.spec.model import LoraSettings, SamplerSettings


class EmaSettings(Section):
    """EMA of the trained weights, what gets evaluated and saved (Flow-GRPO: 0.9 every 8 steps)."""

    decay: Decay = 0.9
    every: PositiveInt = 8


class GRPOSettings(TrainingMemory):
    """Flow-GRPO: group-relative advantages, PPO-clip, KL to the frozen base (docs/method.md#teachers-flow-grpo)."""

    group_size: Annotated[int, Field(strict=True, ge=2, le=INT_MAX)] = 8
    prompts_per_step: PositiveInt = 4
    steps: PositiveInt = 150
    lr: PositiveFloat = 3e-4
    clip_eps: PositiveFloat = 1e-4
    beta: NonNegFloat = 0.04
    """Weight of KL(policy step || base step)."""
    adv_std: Literal[C.ADVANTAGE_STDS] = "group"
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

    @model_validator(mode="after")
    def _sde_rollouts(self):
        if self.sampler.noise_level <= 0:
            raise ValueError("GRPO needs the SDE sampler (sampler.noise_level > 0) for its log-probs")
        if self.sampler.steps < 2:
            raise ValueError("GRPO needs sampler.steps >= 2 (the last step, to sigma 0, is never trained)")
        return self

    def _batch_split(self):
        return self.prompts_per_step * self.group_size, "prompts_per_step x group_size", (
            "micro_batch", "decode_batch", "reward_batch")


class GRPOMethod(GRPOSettings):
    """Flow-GRPO (flowopd/methods/grpo.py): the paper's teacher trainer."""

    kind: Literal["grpo"]


class NFTMethod(TrainingMemory):
    """DiffusionNFT (flowopd/methods/nft.py): flow matching on the policy's own samples, good ones against bad ones."""

    kind: Literal["nft"]
    group_size: Annotated[int, Field(strict=True, ge=2, le=INT_MAX)] = 8
    prompts_per_step: PositiveInt = 4
    steps: PositiveInt = 100
    lr: PositiveFloat = 1e-4
    beta: PositiveFloat = 1.0
    """Strength of the implicit policies v+- = v_old +- beta (v - v_old); the trust region is ~1 / beta."""
    kl_beta: NonNegFloat = 0.0
    """Weight of ||v - v_ref||^2, the velocity-space KL to the frozen starting model."""
    adv_std: Literal[C.ADVANTAGE_STDS] = "group"
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

    def _batch_split(self):
        return self.prompts_per_step * self.group_size, "prompts_per_step x group_size", (
            "micro_batch", "decode_batch", "reward_batch")


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
    advantage: Literal[C.ADVANTAGE_MODES] = "joint"
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
    mode: Literal[C.MERGE_MODES] = "linear"
    weights: Annotated[dict[Name, NonNegFloat], Field(min_length=1)]
    """Per teacher, all teachers named."""
    lora_merge: Literal[C.LORA_MERGES] = "product"
    """LoRA teachers: merge the products B A (correct) or the factors A, B separately (reference code)."""
    ties_density: Fraction = 0.2
    scale: PositiveFloat = 1.0


class SFTColdStart(TrainingMemory):
    """Student = base fine-tuned by flow matching on samples each teacher draws for its routed prompts."""

    method: Literal["sft"]
    steps: PositiveInt = 200
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-4
    samples_per_prompt: PositiveInt = 4
    best_of_group: Bool = False
    """Keep only each prompt's best-reward sample."""
    target_sampler: Literal[C.SFT_TARGET_SAMPLERS] = "evaluation"
    """Which sampler draws the teachers' samples: evaluation, the evaluation's (its deterministic ODE, as in
    Flow-GRPO-style SFT on teacher images); rollout, this section's `sampler`."""
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    """The teachers' sampler with target_sampler: rollout (the top-level rollout sampler and the keys set here)."""
    lora: LoraSettings | None = None

    def _batch_split(self):  # decode_batch and reward_batch split the best-of-group scoring, not a fitting batch
        return self.batch_size, "batch_size", ("micro_batch",)


class NoColdStart(Section):
    """Student = the base model."""

    method: Literal["none"]


ColdStart = Annotated[MergeColdStart | SFTColdStart | NoColdStart, Field(discriminator="method")]


class QuerySettings(Section):
    """Where velocity_mse queries the routed teacher: one state per rollout, its sampler step drawn per sample."""

    steps: tuple[NonNegInt, NonNegInt] | None = None
    """[first, last] sampler steps to draw from (inclusive; 0 is pure noise, steps - 1 the last state before the
    sample); null: the low-noise half [steps // 2, steps - 1] (DiffusionOPSD's DanceOPD run)."""
    draw: Literal[C.QUERY_DRAWS] = "uniform"
    """uniform over the range, or beta: u ~ Beta(5, 2) mapped onto it, biased to its low-noise end (DanceOPD's
    default over the whole trajectory)."""

    @field_validator("steps")
    @classmethod
    def _ordered(cls, value):
        if value is not None and value[0] > value[1]:
            raise ValueError(f"first step {value[0]} is after last step {value[1]}")
        return value


class ReferenceKLSettings(Section):
    """The advantage of estimator reference_kl, A_t = clamp(kl_scale D_t, -adv_clip, adv_clip) with D_t the step
    divergence mean_d (mu_S - mu_T)^2 / (2 sd(s)^2) (docs/estimators.md); the defaults are the reference code's
    (CostaliyA/Flow-OPD, config/grpo.py mix_opd_8gpu and config/base.py)."""

    kl_scale: Float = -1.0
    """Multiplies D_t into the advantage (train.kl_scale); negative: A = -D, the distance to the teacher as a cost."""
    adv_clip: PositiveFloat = 5.0
    """Advantages clamped to +-adv_clip (train.adv_clip_max); no gradient flows through a clamped advantage."""

    @field_validator("kl_scale")
    @classmethod
    def _nonzero(cls, value):
        if value == 0:
            raise ValueError("kl_scale 0 makes every advantage 0 (the reference code then trains nothing)")
        return value


class OPDSettings(MicroBatch, GradientCheckpointing):
    """Multi-teacher on-policy distillation: the routed teacher's step at the student's own states."""

    estimator: Literal[C.ESTIMATORS] = "sampled"
    """How the per-step distance to the teacher trains the student (flowopd/methods/opd_objectives.py; docs/estimators.md). PPO on a
    per-step reward: sampled (log p_teacher - log p_student at the student's x'), analytic (-KL in closed form,
    detached). Differentiated: analytic_grad (the closed-form step KL, GKD-style: DiffusionOPD's objective on SDE
    rollouts), diffusion_opd (DiffusionOPD's code: ||mu_S - mu_T||^2 / 2 on ODE rollouts, / (2 a^2 s / (1 - s)) on
    the SDE), velocity_mse (DanceOPD: ||v_S - v_T||^2 at one low-noise state per rollout, see `query`). The Flow-OPD
    reference code's own updates: reference_kl (PPO-clip with the advantage clamp(kl_scale D), D = ||mu_S - mu_T||^2
    / (2 sd(s)^2) computed with the student's gradient, see `reference_kl`) and gkd (D differentiated directly).
    sampled, analytic, analytic_grad, reference_kl and gkd need the SDE sampler (noise_level > 0); diffusion_opd and
    velocity_mse also take the ODE (noise_level 0)."""
    credit: Literal[C.CREDITS] = "step"
    """step: one reward per sample and trained step, advantage of the step's log-prob (the paper's); element: each
    latent element's log-ratio is the advantage of that element's log-prob (per-token OPD with the elements as
    tokens): the same expected gradient without the other elements' noise. Only sampled and analytic have a reward
    to credit."""
    query: QuerySettings | None = None
    """velocity_mse only: which state of each rollout is queried; null: QuerySettings' defaults."""
    reference_kl: ReferenceKLSettings | None = None
    """reference_kl only: its advantage's scale and clamp; null: the reference code's (kl_scale -1, adv_clip 5)."""
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

    def _batch_split(self):
        return self.prompts_per_step * self.group_size, "prompts_per_step x group_size", ("micro_batch",)

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
        if self.sampler.steps < 2:
            raise ValueError("OPD needs sampler.steps >= 2 (the last step, to sigma 0, is never trained)")
        if self.estimator in C.SDE_ESTIMATORS and self.sampler.noise_level == 0:
            raise ValueError(f"estimator {self.estimator} needs the SDE sampler (sampler.noise_level > 0) for its "
                             "Gaussian steps; on the ODE use diffusion_opd or velocity_mse")
        if self.query is not None:
            if self.estimator != "velocity_mse":
                raise ValueError(f"query applies to estimator velocity_mse, not {self.estimator}")
            if self.query.steps is not None and self.query.steps[1] >= self.sampler.steps:
                raise ValueError(f"query.steps {list(self.query.steps)} reaches past the sampler's last step "
                                 f"{self.sampler.steps - 1}")
        return self

    @model_validator(mode="after")
    def _reference_estimators_as_the_reference_code(self):
        if self.reference_kl is not None and self.estimator != "reference_kl":
            raise ValueError(f"reference_kl applies to estimator reference_kl, not {self.estimator}")
        if self.estimator not in C.REFERENCE_ESTIMATORS:
            return self
        if self.sampler.logprob_reduction != "mean":
            raise ValueError(f"estimator {self.estimator} is the reference code's update on Flow-GRPO's log-probs and "
                             "divergences averaged over elements: it needs sampler.logprob_reduction mean")
        if self.reward_to_go or self.normalize_advantage:
            raise ValueError(f"estimator {self.estimator} has no per-step reward to sum or standardise: "
                             "reward_to_go and normalize_advantage must be false")
        batch = self.prompts_per_step * self.group_size
        if self.estimator == "reference_kl" and self.micro_batch is not None and self.micro_batch < batch:
            raise ValueError(f"estimator reference_kl pairs every sample's advantage with every sample's ratio (the "
                             f"reference code's (B, 1) x (B,) broadcast), so micro_batch {self.micro_batch} may not "
                             f"split the batch ({batch}): leave it unset")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_query(self, handler):
        """An unset query or reference_kl (and memory settings at their defaults) are left out of the dump, so specs
        written before they existed keep their hash."""
        data = without_memory_defaults(handler(self))
        return {k: v for k, v in data.items() if not (k in ("query", "reference_kl") and v is None)}


class MARSettings(Section):
    """Manifold Anchor Regularisation: loss += weight * KL(student step || anchor step)."""

    anchor: str = "base"
    """A teacher name (the aesthetic / quality teacher) or "base"."""
    weight: NonNegFloat = 0.02
    """lambda; 0 turns MAR off."""

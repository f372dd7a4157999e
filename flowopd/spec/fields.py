"""Field types and the base of every spec section: strict (YAML `true` is not 1), frozen, no unknown keys."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from flowopd.spec.choices import TASK_FAMILIES
from flowopd.spec.paths import check_spec_path

# Integers end up in torch (sizes, indices, step counters: int32 on GPUs) and seeds in numpy and torch generators.
INT_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # numpy's legacy seeds and torch.manual_seed both take it; `seed * 1_000_003 + i` fits int64
PositiveInt = Annotated[int, Field(strict=True, gt=0, le=INT_MAX)]
NonNegInt = Annotated[int, Field(strict=True, ge=0, le=INT_MAX)]
Seed = Annotated[int, Field(strict=True, ge=0, le=SEED_MAX)]
Float = Annotated[float, Field(strict=True)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
NonNegFloat = Annotated[float, Field(strict=True, ge=0)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1)]
Fraction = Annotated[float, Field(strict=True, gt=0, le=1)]  # in (0, 1]
Decay = Annotated[float, Field(strict=True, ge=0, lt=1)]  # in [0, 1)
Bool = Annotated[bool, Field(strict=True)]
# Strings that reach a command line, a path or a file name hold only what they are for (docs/specs.md#safe-by-design).
Name = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]  # task and teacher names
Label = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:()+,=@-]*$")]  # a report row
RESERVED_LABELS = ("base", "mixed_grpo")  # with `teacher:<name>`, the rows of the models every spec trains
# A file or folder: relative (to the repository root) without `..`, or absolute inside FLOWOPD_DATA_ROOTS.
SpecPath = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(check_spec_path)]
TinyTask = Literal[TASK_FAMILIES]
DISCRIMINATORS = ("kind", "method")  # the keys that choose a variant of a section (discriminated unions)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)

    @field_validator("*")
    @classmethod
    def _sorted_mappings(cls, value):
        """Mappings iterate in key order, so two specs with one hash also loop over tasks (etc.) alike."""
        return dict(sorted(value.items())) if isinstance(value, dict) else value


def unique(values):
    """Field validator: refuse repeated entries (a list of colours, seeds, benchmarks...)."""
    if values is None:
        return values
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"repeated entries: {', '.join(map(str, repeated))}")
    return values


# ---------------------------------------------------------------- memory settings (micro-batches, checkpointing)
MEMORY_DEFAULTS = {"micro_batch": None, "decode_batch": None, "reward_batch": None, "gradient_checkpointing": False}


def without_memory_defaults(data: dict) -> dict:
    """A section's dump without the memory settings left at their defaults: they change how a batch is computed, not
    what (up to float summation order), so specs written before they existed keep their hash and stage keys. The
    ones set come last, in MEMORY_DEFAULTS' order, wherever their section declares them."""
    settings = {k: data[k] for k in MEMORY_DEFAULTS if k in data and data[k] != MEMORY_DEFAULTS[k]}
    return {k: v for k, v in data.items() if k not in MEMORY_DEFAULTS} | settings


class MemorySettings(Section):
    """Base of the sections that take memory settings (docs/gpu.md#micro-batches) from the mixins below: left out of
    the dump at their defaults, and no micro-batch larger than the batch it splits (over several processes, a
    micro-batch above a process's share is that whole share)."""

    def _batch_split(self) -> tuple[int, str, tuple[str, ...]] | None:
        """(the batch, its name, the settings that split it) for the size check; None: nothing to check."""
        return None

    @model_validator(mode="after")
    def _micro_batches_fit(self):
        split = self._batch_split()
        if split is not None:
            batch, batch_name, names = split
            for name in names:
                value = getattr(self, name)
                if value is not None and value > batch:
                    raise ValueError(f"{name} {value} is larger than the batch it splits ({batch_name} = {batch})")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_memory_settings(self, handler):
        return without_memory_defaults(handler(self))


class MicroBatch(MemorySettings):
    micro_batch: PositiveInt | None = None
    """Samples per transformer forward in every model call of the phase: sampling (rollouts, OPD's teacher and
    anchor targets, the SFT teachers' samples) and each update or fitting batch (gradients accumulate over them);
    SFT: also prompts per text-encoder call. CFG doubles the rows (NFT: its two branches are separate forwards).
    Null: the whole call (a process's share of the step). Rollout and update split alike, so the first epoch's PPO
    ratio is 1; the noise is drawn per call, so the samples do not depend on it."""


class DecodeBatch(MemorySettings):
    decode_batch: PositiveInt | None = None
    """Images per VAE decode (rollouts, the best-of-group scoring, the evaluation's sampling calls); null: all the
    images of the call (a rollout: the process's share) at once."""


class RewardBatch(MemorySettings):
    reward_batch: PositiveInt | None = None
    """Images per reward call; null: each task's images of the step at once."""


class GradientCheckpointing(MemorySettings):
    gradient_checkpointing: Bool = False
    """Recompute the transformer's activations in the backward pass: far less memory, about a third more compute."""


class TrainingMemory(MicroBatch, DecodeBatch, RewardBatch, GradientCheckpointing):
    """All four memory settings: the reward trainers (GRPO, NFT) and the SFT cold start."""

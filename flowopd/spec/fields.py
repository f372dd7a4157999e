"""Field types and the base of every spec section: strict (YAML `true` is not 1), frozen, no unknown keys."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

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
    what (up to float summation order), so specs written before they existed keep their hash and stage keys."""
    return {k: v for k, v in data.items() if k not in MEMORY_DEFAULTS or v != MEMORY_DEFAULTS[k]}


def micro_batch_problem(section, batch: int, batch_name: str = "prompts_per_step x group_size",
                        names=("micro_batch", "decode_batch", "reward_batch")) -> str | None:
    """The first micro-batch larger than the batch it splits (`batch`, named `batch_name`), named; None if fine.
    Over several processes a micro-batch above a process's share is that whole share."""
    for name in names:
        value = getattr(section, name, None)
        if value is not None and value > batch:
            return f"{name} {value} is larger than the batch it splits ({batch_name} = {batch})"
    return None

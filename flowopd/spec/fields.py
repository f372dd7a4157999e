"""Field types and the base of every spec section: strict (YAML `true` is not 1), frozen, no unknown keys."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowopd.spec.choices import TASK_FAMILIES

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

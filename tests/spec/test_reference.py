"""The docs' field reference is generated from the schema: every section and every field, with its constraints and
default."""

import re

from flowopd.spec import OPDSettings, Spec, World
from flowopd.spec.reference import field_reference


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (\w+) \{#\w+\}$", text, flags=re.MULTILINE)[1:]
    return dict(zip(parts[::2], parts[1::2]))


def test_every_field_of_every_section_is_listed():
    found = sections(field_reference())
    for model in (Spec, World, OPDSettings):
        rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", found[model.__name__], flags=re.MULTILINE)}
        assert rows == set(model.model_fields), model.__name__
    assert {"TinyModel", "SD3Model", "GRPOMethod", "NFTMethod", "MergeColdStart", "SFTColdStart"} <= set(found)


def test_types_carry_constraints_defaults_and_docstrings():
    text = field_reference()
    assert "| `canvas` | int (> 0) | `32` |" in text
    assert ('| `estimator` | one of "sampled", "analytic", "analytic_grad", "diffusion_opd", "velocity_mse", '
            '"reference_kl", "gkd" |') in text
    assert "[TinyModel](#tinymodel) or [SD3Model](#sd3model), chosen by `kind`" in text
    assert "Random sizes and positions" in text  # World.jitter's docstring

"""`training_seeds`: how many times the phases after the base train; validated, left out of the hash at 1."""

import pytest
from test_spec import minimal, problems

from flowopd.spec import spec_hash, validate_spec
from flowopd.spec.fields import SEED_MAX


@pytest.mark.parametrize("value, expected", [
    (0, "training_seeds: Input should be greater than 0"),
    (-2, "training_seeds: Input should be greater than 0"),
    (1.5, "training_seeds: Input should be a valid integer"),
    (True, "training_seeds: Input should be a valid integer"),
])
def test_a_count_below_one_or_not_an_integer_is_refused_naming_the_field(value, expected):
    found = problems(minimal() | {"training_seeds": value})
    assert any(line.startswith(f"t.yaml: {expected}") for line in found), found


def test_the_last_training_seed_must_still_be_a_seed():
    found = problems(minimal() | {"seed": SEED_MAX - 1, "training_seeds": 3})
    assert any(line.startswith("t.yaml: training_seeds: ") and str(SEED_MAX) in line for line in found), found
    assert validate_spec(minimal() | {"seed": SEED_MAX - 1, "training_seeds": 2}).training_seeds == 2


def test_one_training_seed_hashes_like_a_spec_that_never_names_it():
    """Specs written before the field existed keep their hash (and every stage key)."""
    plain = validate_spec(minimal())
    assert plain.training_seeds == 1 and "training_seeds" not in plain.model_dump(mode="json")
    assert spec_hash(validate_spec(minimal() | {"training_seeds": 1})) == spec_hash(plain)
    assert spec_hash(validate_spec(minimal() | {"training_seeds": 2})) != spec_hash(plain)


def test_a_training_seed_view_trains_with_seed_plus_index_and_names_the_file_spec():
    spec = validate_spec(minimal() | {"seed": 7, "training_seeds": 3})
    assert spec.training_seed is None and spec.source_hash == spec_hash(spec)
    first, third = spec.for_training_seed(0), spec.for_training_seed(2)
    assert (first.seed, first.training_seed) == (7, 0) and first.model_dump() == spec.model_dump()
    assert (third.seed, third.training_seed) == (9, 2)
    assert third.source_hash == first.source_hash == spec_hash(spec) != spec_hash(third)
    assert third.model_copy(update={"opd": third.opd}).training_seed == 2  # copies (sd3's sft) keep it
    with pytest.raises(ValueError, match="training seed 3 is not one of the spec's 3"):
        spec.for_training_seed(3)
    with pytest.raises(ValueError, match="already the view"):
        third.for_training_seed(1)

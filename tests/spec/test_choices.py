"""Each list of choices is defined once (flowopd.spec.choices): the schema offers exactly it, and the registry or
code that implements it covers exactly it."""

import typing

import pytest

from flowopd.methods.reward_trainers import REWARD_TRAINERS
from flowopd.rewards import REWARDS
from flowopd.spec import (
    Baseline,
    BaseTraining,
    FilePrompts,
    GRPOSettings,
    MergeColdStart,
    OCRSettings,
    OPDSettings,
    QuerySettings,
    SamplerSettings,
    Task,
)
from flowopd.spec import choices as C
from flowopd.spec.training import ColdStart, TeacherMethod
from flowopd.world import DEGRADATIONS, TASKS


def literal(model, field) -> tuple:
    """The values a Literal field (or a dict keyed by one) accepts."""
    annotation = model.model_fields[field].annotation
    if typing.get_origin(annotation) is dict:
        annotation = typing.get_args(annotation)[0]
    return typing.get_args(annotation)


@pytest.mark.parametrize(("model", "field", "choices"), [
    (OPDSettings, "estimator", C.ESTIMATORS),
    (OPDSettings, "credit", C.CREDITS),
    (QuerySettings, "draw", C.QUERY_DRAWS),
    (SamplerSettings, "sde", C.SDE_KINDS),
    (SamplerSettings, "logprob_reduction", C.LOGPROB_REDUCTIONS),
    (Task, "reward", C.REWARDS),
    (FilePrompts, "format", C.PROMPT_FILE_FORMATS),
    (OCRSettings, "page_mode", C.OCR_PAGE_MODES),
    (GRPOSettings, "adv_std", C.ADVANTAGE_STDS),
    (Baseline, "advantage", C.ADVANTAGE_MODES),
    (MergeColdStart, "mode", C.MERGE_MODES),
    (MergeColdStart, "lora_merge", C.LORA_MERGES),
    (BaseTraining, "time_sampling", C.TIME_SAMPLINGS),
    (BaseTraining, "flaws", C.FLAWS),
    (BaseTraining, "task_mix", C.TASK_FAMILIES),
])
def test_the_schema_offers_exactly_the_choices(model, field, choices):
    assert literal(model, field) == choices


def union_tags(union, key: str) -> set:
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(member.model_fields[key].annotation)[0] for member in members}


def test_registries_cover_exactly_the_choices():
    assert set(REWARDS) == set(C.REWARDS) == set(C.REWARD_METRICS)
    assert set(REWARD_TRAINERS) == set(C.TEACHER_METHODS) == union_tags(TeacherMethod, "kind")
    assert union_tags(ColdStart, "method") == set(C.COLD_START_METHODS)
    assert TASKS == C.TASK_FAMILIES and DEGRADATIONS == C.FLAWS
    assert set(C.PPO_ESTIMATORS) | set(C.SDE_ESTIMATORS) <= set(C.ESTIMATORS)
    assert set(C.NEEDS_SETTINGS) <= set(C.REWARD_SETTINGS) <= set(C.REWARDS)

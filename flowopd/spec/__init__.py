"""Experiment specs: YAML files validated into a frozen `Spec` (pydantic v2), with `extends` and content hashes.

    from flowopd.spec import load_spec, spec_hash
    spec = load_spec("specs/ablations/no_mar.yaml")   # SpecError: one line per problem, naming file and field

Modules, bottom up: `choices` (every list of choices), `fields` (field types, the section base), `errors`, `model`,
`tasks`, `training` (the sections), `hashing`, `extends` (strict YAML, the extends chain), `schema` (the whole `Spec`,
cross-section checks, JSON Schema), `validation` (loading, validating, the problems' messages), `reference` (the
field reference the docs show), `spec_cli` (`flowopd spec ...`). Imports: stdlib, pydantic and yaml only, so the CLI
answers fast.
"""

from flowopd.spec.errors import SpecError
from flowopd.spec.extends import deep_merge, extends_chain, resolve_raw
from flowopd.spec.hashing import canonical_hash, canonical_json, spec_hash
from flowopd.spec.model import BaseTraining, LoraSettings, SamplerSettings, SD3Model, TinyModel
from flowopd.spec.schema import Spec, json_schema
from flowopd.spec.tasks import (
    Evaluation,
    FilePrompts,
    OCRSettings,
    PickScoreSettings,
    RemoteSettings,
    Task,
    TinyPrompts,
    World,
)
from flowopd.spec.training import (
    Baseline,
    EmaSettings,
    GRPOMethod,
    GRPOSettings,
    MARSettings,
    MergeColdStart,
    NFTMethod,
    NoColdStart,
    OPDSettings,
    QuerySettings,
    ReferenceKLSettings,
    Router,
    RouterRule,
    SFTColdStart,
    Teacher,
)
from flowopd.spec.validation import load_spec, load_spec_or_exit, validate_spec

__all__ = [
    "BaseTraining", "Baseline", "EmaSettings", "Evaluation", "FilePrompts", "GRPOMethod", "GRPOSettings",
    "LoraSettings", "MARSettings", "MergeColdStart", "NFTMethod", "NoColdStart", "OCRSettings", "OPDSettings",
    "PickScoreSettings", "QuerySettings", "ReferenceKLSettings", "RemoteSettings", "Router", "RouterRule", "SD3Model",
    "SFTColdStart", "SamplerSettings", "Spec", "SpecError", "Task", "Teacher", "TinyModel", "TinyPrompts", "World",
    "canonical_hash", "canonical_json", "deep_merge", "extends_chain", "json_schema", "load_spec",
    "load_spec_or_exit", "resolve_raw", "spec_hash", "validate_spec",
]

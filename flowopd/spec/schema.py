"""The whole spec: its sections, the defaults one section takes from another, checks that span sections, JSON Schema."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from flowopd.spec import choices as C
from flowopd.spec.errors import dotted
from flowopd.spec.extends import deep_merge
from flowopd.spec.fields import (
    DISCRIMINATORS,
    RESERVED_LABELS,
    SEED_MAX,
    Label,
    Name,
    PositiveInt,
    Section,
    Seed,
)
from flowopd.spec.hashing import canonical_hash, spec_hash
from flowopd.spec.model import BaseTraining, Model, SamplerSettings, SD3Model, TinyModel
from flowopd.spec.tasks import Evaluation, FilePrompts, Task, TinyPrompts, World
from flowopd.spec.training import (
    Baseline,
    ColdStart,
    MARSettings,
    MergeColdStart,
    OPDSettings,
    Router,
    Teacher,
)


class Spec(Section):
    """A whole Flow-OPD experiment: world, model, base, tasks, teachers, baseline, cold start, OPD, eval."""

    name: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    label: Label | None = None
    """Row label in the report (e.g. "flow_opd:no_mar"); absent: the name. Letters, digits, spaces and
    `_ . : ( ) + , = @ -`: it is a command-line argument of the eval stage."""
    description: Annotated[str, Field(max_length=2000)] = ""
    seed: Seed = 0
    training_seeds: PositiveInt = 1
    """How many times every phase after the base trains, each time with its own seed: index i trains with
    `seed + i`; data and base are shared (docs/specs.md#training-seeds)."""
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
    # Set on the spec `for_training_seed` returns: its seed index and the hash of the spec it came from.
    _training_seed: int | None = PrivateAttr(None)
    _source_hash: str | None = PrivateAttr(None)

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

    @field_validator("label")
    @classmethod
    def _not_a_shared_row(cls, value):
        """The base, teacher and mixed-baseline rows have fixed labels; a spec's own row must not take one."""
        if value in RESERVED_LABELS or (value or "").startswith("teacher:"):
            raise ValueError(f"{value!r} is the label of a model every spec trains (base, mixed_grpo, teacher:*)")
        return value

    @model_validator(mode="after")
    def _cross_field_checks(self):
        problems = cross_field_problems(self)
        if problems:
            summary = "; ".join(f"{dotted(loc)}: {msg}" for loc, msg in problems)
            raise PydanticCustomError("spec_checks", "{summary}", {"summary": summary, "problems": problems})
        return self

    @field_validator("training_seeds")
    @classmethod
    def _seeds_in_range(cls, value, info):
        seed = info.data.get("seed")
        if isinstance(seed, int) and seed + value - 1 > SEED_MAX:
            raise ValueError(f"the last training seed, seed {seed} + {value - 1}, exceeds {SEED_MAX}")
        return value

    @model_serializer(mode="wrap")
    def _omit_single_training_seed(self, handler):
        """One training seed (the default) is left out of the dump, so specs written before the field existed keep
        their hash."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "training_seeds" and v == 1)}

    def for_training_seed(self, index: int) -> Spec:
        """The spec as the phases after the base read it for training seed `index`: `seed` is that seed's value,
        `seed + index` (index 0: the spec itself, unchanged). It keeps the index and the hash of this spec, which
        its runs record (flowopd.runtime.artifacts.spec_identity); stage keys come from this spec, not from it."""
        if self._training_seed is not None:
            raise ValueError("this spec is already the view of one training seed: ask the spec it came from")
        if not 0 <= index < self.training_seeds:
            raise ValueError(f"training seed {index} is not one of the spec's {self.training_seeds} "
                             f"(training_seeds: indices 0 to {self.training_seeds - 1})")
        view = self.model_copy(update={"seed": self.seed + index})
        view._training_seed, view._source_hash = index, spec_hash(self)
        return view

    @property
    def training_seed(self) -> int | None:
        """The training seed index of a spec from `for_training_seed`; None for a spec read from a file."""
        return self._training_seed

    @property
    def source_hash(self) -> str:
        """The hash of the spec as its file gives it (for one from `for_training_seed`: the original's)."""
        return self._source_hash or spec_hash(self)

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
        return canonical_hash(self.sections(*names))


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
    expect(spec.evaluation.dtype is None or isinstance(spec.model, TinyModel), ("evaluation", "dtype"),
           "an sd3 model samples in model.dtype; evaluation.dtype sets the tiny model's")
    for name, task in spec.tasks.items():
        tiny_prompts = isinstance(task.prompts, TinyPrompts)
        if isinstance(spec.model, SD3Model):
            expect(task.reward not in C.TINY_WORLD_REWARDS, ("tasks", name, "reward"),
                   f"reward {task.reward!r} scores the tiny world's renders; an sd3 spec uses ocr, pickscore or remote")
        expect(task.reward != "objects" or tiny_prompts, ("tasks", name, "reward"),
               "reward 'objects' needs the tiny world's structured prompts (prompts.kind tiny)")
        if task.reward == "ocr" and task.ocr is None:
            expect(tiny_prompts and isinstance(spec.model, TinyModel), ("tasks", name, "ocr"),
                   "the tiny world's OCR reader reads only tiny renders of tiny prompts; "
                   "add `ocr: {}` for the scene reader")
    for name, teacher in spec.teachers.items():
        expect(name not in C.ROUTER_DEFAULTS, ("teachers", name),
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
    expect(default in teachers or default in C.ROUTER_DEFAULTS, ("router", "default"),
           f"unknown teacher {default!r}; expected one of {one_of(teachers + list(C.ROUTER_DEFAULTS))}")
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
    n, split = spec.evaluation.n_prompts, spec.evaluation.split
    for name in spec.evaluation.benchmarks or ():
        prompts = spec.tasks[name].prompts if name in spec.tasks else None
        if n is not None and isinstance(prompts, TinyPrompts):
            size = getattr(prompts, f"n_{split}")
            expect(n <= size, ("evaluation", "n_prompts"),
                   f"{n} exceeds the {split} set of task {name!r} (n_{split} {size})")
        if split == "val" and isinstance(prompts, FilePrompts):
            expect(prompts.val is not None, ("evaluation", "split"),
                   f"task {name!r} has no validation prompts (its prompts give no `val` file)")
    return problems


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

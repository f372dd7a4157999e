"""Hard routing: rules in order on task tags, whole-word keywords and regexes; defaults; checks before training."""

from pathlib import Path

import pytest

from flowopd.methods.router import Router, RoutingError, format_summary
from flowopd.spec import RouterRule, deep_merge, load_spec, resolve_raw, validate_spec
from flowopd.world.grammar import ObjectGroup, objects_prompt, quality_prompt, text_prompt
from flowopd.world.prompt_sets import training_prompts

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "data" / "micro.yaml"
TEACHERS = ("text", "objects", "quality")
SIGN, SCENE, CLEAN = text_prompt("KO"), objects_prompt((ObjectGroup("red", "circle", 2),)), quality_prompt("red", "square")


def router(*rules, default="error"):
    return Router([RouterRule(**r) for r in rules], default, TEACHERS)


def test_task_rules_route_each_prompt_by_its_task_tag():
    r = router({"task": "text", "teacher": "text"}, {"task": "objects", "teacher": "objects"}, default="quality")
    assert [r.route(p) for p in (SIGN, SCENE, CLEAN)] == ["text", "objects", "quality"]
    # The task of origin (the spec task the prompt came from) wins over the prompt's own family tag.
    assert r.route(SIGN, task="objects") == "objects"


def test_keywords_match_whole_words_in_any_case():
    r = router({"keywords": ["SIGN"], "teacher": "text"}, {"keywords": ["left of"], "teacher": "objects"},
               default="base")
    assert r.route("A Sign that says \"KO\"") == "text"
    assert r.route("a signal that says KO") == "base"  # a substring is not a word
    assert r.route("a red circle left of a blue square") == "objects"
    assert r.route("a red circle left ofa blue square") == "base"


def test_regex_rules_search_and_the_first_matching_rule_wins():
    r = router({"regex": r'"[A-Z]+"', "teacher": "text"}, {"regex": "circle", "teacher": "objects"},
               {"keywords": ["circle"], "teacher": "quality"})
    assert r.route('a circle sign that says "KO"') == "text"
    assert r.route("a photo of two red circles") == "objects"  # re.search: substrings match
    assert r.route("A CIRCLE") == "quality"  # regexes are case-sensitive, keywords are not


def test_default_error_quotes_the_unmatched_prompts():
    r = router({"task": "text", "teacher": "text"})
    with pytest.raises(RoutingError, match="a photo of two red circles"):
        r.route(SCENE)
    with pytest.raises(RoutingError, match=r"2 of 3 prompts match no router rule.*two red circles.*clean, sharp"):
        r.route_all([SIGN, SCENE, CLEAN])


def test_summary_counts_prompts_per_teacher_and_base():
    r = router({"task": "text", "teacher": "text"}, default="base")
    counts = r.summary([SIGN, SCENE, CLEAN, SIGN])
    assert counts == {"text": 2, "base": 2}
    assert format_summary(counts) == "routing 4 prompts: text 2, base 2"
    assert r.route_all([SIGN, CLEAN]) == ["text", "base"]


@pytest.mark.parametrize(("rules", "default", "message"), [
    ([{"task": "text", "teacher": "ocr"}], "error", "unknown teacher 'ocr'"),
    ([], "student", "router default 'student' is not a teacher"),
])
def test_unknown_names_are_rejected_by_name(rules, default, message):
    with pytest.raises(ValueError, match=message):
        router(*rules, default=default)


def test_spec_router_routes_every_train_prompt(tmp_path):
    from flowopd.phases.data import run_data

    spec = load_spec(MICRO)
    run_data(spec, tmp_path / "data")
    prompts, tasks = training_prompts(spec, tmp_path / "data")
    assert Router.from_spec(spec).summary(prompts, tasks) == {"objects": 8, "quality": 8, "text": 8}
    raw = deep_merge(resolve_raw(MICRO), {"router": {"rules": [{"task": "text", "teacher": "text"}],
                                                     "default": "base"}})
    routes = Router.from_spec(validate_spec(raw)).route_all(prompts, tasks)
    assert routes == ["text" if task == "text" else "base" for task in tasks]

import json
from pathlib import Path

import numpy as np
import pytest

from flowopd.spec import load_spec
from flowopd.world import (
    DEGRADATIONS,
    OBJECT_KINDS,
    PALETTE,
    SPLITS,
    TASKS,
    ObjectGroup,
    Prompt,
    WorldConfig,
    all_prompts,
    content_key,
    corrupt_prompt,
    degrade,
    distinct_contents,
    make_prompt_set,
    objects_prompt,
    quality_scene,
    render,
    sample_prompts,
    scene_phrase,
    split_prompts,
)
from flowopd.world.prompt_sets import build_prompt_sets, content_census, world_config

WORLD = WorldConfig()


@pytest.mark.parametrize("task", TASKS)
def test_prompt_sets_are_deterministic_and_held_out_sets_distinct(task):
    train = make_prompt_set(WORLD, task, 300, seed=0, split="train")
    assert train == make_prompt_set(WORLD, task, 300, seed=0, split="train")
    assert train != make_prompt_set(WORLD, task, 300, seed=1, split="train")
    assert all(p.task == task for p in train)
    for split in ("val", "test"):
        pool = split_texts(task, split)
        held_out = make_prompt_set(WORLD, task, len(pool), seed=2, split=split)
        assert {p.text for p in held_out} == pool  # every prompt once before any repeats
    grammar = {p.text for family in all_prompts(WORLD, task).values() for p in family}
    assert split_texts(task, "train") <= grammar and split_texts(task, "train")


def test_no_held_out_content_appears_in_another_split_of_any_task():
    contents = {(task, split): {content_key(p) for family in split_prompts(WORLD, task, split).values()
                                for p in family} for task in TASKS for split in SPLITS}
    for (task, split), keys in contents.items():
        if split == "train":
            continue
        others = set().union(*(k for where, k in contents.items() if where != (task, split)))
        assert keys and keys.isdisjoint(others), (task, split)
    # the same scene in other words is the same content: a quality prompt, a mirrored relation
    scene = objects_prompt((ObjectGroup("red", "circle"), ObjectGroup("blue", "square")), "left of")
    mirrored = objects_prompt((ObjectGroup("blue", "square"), ObjectGroup("red", "circle")), "right of")
    assert content_key(scene) == content_key(mirrored) == content_key(quality_scene(mirrored, 2))
    assert content_key(scene) != content_key(objects_prompt(scene.objects, "above"))


def test_held_out_sizes_of_the_main_and_the_default_world():
    spec = load_spec(Path(__file__).parents[2] / "specs/flow_opd.yaml")
    world = world_config(spec)
    held = {task: (distinct_contents(world, task, "test"), distinct_contents(world, task, "val")) for task in TASKS}
    assert held == {"text": (32, 16), "objects": (37, 19), "quality": (37, 19)}
    for name, task in spec.tasks.items():  # the spec asks for all of it, so the data phase accepts it
        assert (task.prompts.n_test, task.prompts.n_val) == held[name]
    # the default world (16 letters, 5 colours, counts to 3) holds 128 / 64 words and 110 / 55 scenes per task
    assert {task: distinct_contents(WORLD, task, "test") for task in TASKS} == {
        "text": 128, "objects": 110, "quality": 110}


def test_the_data_phase_refuses_a_world_too_small_for_its_held_out_sets():
    spec = load_spec(Path(__file__).parents[2] / "specs/flow_opd.yaml")
    small = spec.model_copy(update={"world": spec.world.model_copy(update={"alphabet": "ACEHKOT"})})
    with pytest.raises(ValueError, match=r"task 'text': the world holds 12 distinct val contents, the spec asks "
                                         r"for 16 \(tasks.text.prompts.n_val\)"):
        build_prompt_sets(small)


def split_texts(task, split):
    return {p.text for family in split_prompts(WORLD, task, split).values() for p in family}


def test_object_sets_cover_every_family_evenly():
    prompts = make_prompt_set(WORLD, "objects", 200, seed=3, split="train")
    counts = {k: sum(p.kind == k for p in prompts) for k in OBJECT_KINDS}
    assert counts == {k: 50 for k in OBJECT_KINDS}
    texts = {p.text for family in all_prompts(WORLD, "objects").values() for p in family}
    assert "a photo of two blue squares" in texts
    assert "a photo of a red circle left of a green square" in texts
    assert 'a sign that says "KO"' in {p.text for p in all_prompts(WORLD, "text")["text"]}


def test_prompt_json_round_trip():
    rng = np.random.default_rng(0)
    for p in sample_prompts(WORLD, rng, 200):
        back = Prompt.from_dict(json.loads(json.dumps(p.to_dict())))
        assert back == p and hash(back) == hash(p)


def test_sample_prompts_mixes_tasks_and_is_seeded():
    a = sample_prompts(WORLD, np.random.default_rng(5), 300)
    assert a == sample_prompts(WORLD, np.random.default_rng(5), 300)
    shares = {t: sum(p.task == t for p in a) / len(a) for t in TASKS}
    assert all(0.25 < s < 0.42 for s in shares.values()), shares


def test_world_config_from_yaml_lists_and_rejects_unknown_names():
    world = WorldConfig(colours=["red", "blue"], shapes=["circle"], relations=["above"])
    assert world.colours == ("red", "blue") and hash(world)
    with pytest.raises(ValueError):
        WorldConfig(colours=("red", "mauve"))


def test_renders_are_seeded_crisp_and_sized():
    allowed = np.array(list(PALETTE.values()) + [(0, 0, 0), (255, 255, 255)])
    for p in sample_prompts(WORLD, np.random.default_rng(1), 100):
        image = render(WORLD, p, np.random.default_rng(7))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, render(WORLD, p, np.random.default_rng(7)))
        assert (image[:, :, None, :] == allowed).all(-1).any(-1).all()  # only white, black, palette pixels
        ink = np.argwhere(image.min(-1) < 255)
        height = ink[:, 0].max() - ink[:, 0].min() + 1
        if p.task == "text":
            assert 18 <= height <= 21 and (image == 0).all(-1).sum() > 60
        else:
            assert height >= 8


def test_corrupt_prompt_changes_one_thing():
    rng = np.random.default_rng(2)
    for p in make_prompt_set(WORLD, "objects", 120, seed=0, split="train"):
        for kind in ["colour", "count"] if not p.relation else ["colour", "relation"]:
            q = corrupt_prompt(WORLD, p, rng, kind)
            assert q.task == p.task and q.text != p.text
            if kind == "colour":
                assert [g.colour for g in q.objects] != [g.colour for g in p.objects]
                assert [(g.shape, g.count) for g in q.objects] == [(g.shape, g.count) for g in p.objects]
            if kind == "count":
                assert [g.count for g in q.objects] != [g.count for g in p.objects]
            if kind == "relation":
                assert q.relation != p.relation and q.objects == p.objects
    for p in make_prompt_set(WORLD, "text", 50, seed=0, split="train"):
        q = corrupt_prompt(WORLD, p, rng)
        assert q.task == "text" and q.word != p.word and len(q.word) == len(p.word)
    for p in make_prompt_set(WORLD, "quality", 40, seed=0, split="train"):
        q = corrupt_prompt(WORLD, p, rng, "colour")
        changed = [(a.colour, b.colour) for a, b in zip(p.objects, q.objects) if a != b]
        assert q.task == "quality" and len(changed) == 1 and q.relation == p.relation
        asked, shown = (scene_phrase(objects_prompt(x.objects, x.relation)) for x in (p, q))
        assert q.text == p.text.replace(asked, shown) and asked in p.text  # the wording kept, the scene changed


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_degrade_is_seeded_and_visible(kind):
    image = render(WORLD, make_prompt_set(WORLD, "objects", 1, 0, "test")[0], np.random.default_rng(0))
    a = degrade(image, np.random.default_rng(3), kind)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, degrade(image, np.random.default_rng(3), kind))
    assert np.abs(a.astype(int) - image).mean() > 5
    with pytest.raises(ValueError):
        degrade(image, np.random.default_rng(0), "jpeg")


def test_the_data_phase_records_distinct_contents_and_refuses_a_leak():
    spec = load_spec(Path(__file__).parents[2] / "specs/flow_opd.yaml")
    sets = build_prompt_sets(spec)
    census = content_census(spec, sets)
    assert {task: (census[task]["test"], census[task]["val"]) for task in TASKS} == {
        "text": (32, 16), "objects": (37, 19), "quality": (37, 19)}
    leaked = sets["quality"]["test"][0]
    sets["objects"]["train"].append(objects_prompt(leaked.objects, leaked.relation))  # the same scene, other words
    with pytest.raises(ValueError, match="1 test contents of task 'quality' also appear in the train split of task "
                                         "'objects'"):
        content_census(spec, sets)

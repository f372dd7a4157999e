import json

import numpy as np
import pytest

from flowopd.world import (
    DEGRADATIONS,
    OBJECT_KINDS,
    PALETTE,
    TASKS,
    Prompt,
    WorldConfig,
    all_prompts,
    corrupt_prompt,
    degrade,
    make_prompt_set,
    render,
    sample_prompts,
    split_prompts,
)

WORLD = WorldConfig()


@pytest.mark.parametrize("task", TASKS)
def test_prompt_sets_are_deterministic_and_splits_disjoint(task):
    train = make_prompt_set(WORLD, task, 300, seed=0, split="train")
    assert train == make_prompt_set(WORLD, task, 300, seed=0, split="train")
    assert train != make_prompt_set(WORLD, task, 300, seed=1, split="train")
    assert all(p.task == task for p in train)
    train_texts = {p.text for s in range(3) for p in make_prompt_set(WORLD, task, 400, s, "train")}
    test_texts = {p.text for s in range(3) for p in make_prompt_set(WORLD, task, 400, s, "test")}
    assert train_texts.isdisjoint(test_texts)
    assert train_texts <= split_texts(task, "train") and test_texts <= split_texts(task, "test")
    grammar = {p.text for family in all_prompts(WORLD, task).values() for p in family}
    assert split_texts(task, "train") | split_texts(task, "test") == grammar
    assert 0.2 < len(split_texts(task, "test")) / len(grammar) < 0.3


def split_texts(task, split):
    return {p.text for family in split_prompts(WORLD, task, split).values() for p in family}


def test_object_sets_cover_every_family_evenly():
    prompts = make_prompt_set(WORLD, "objects", 200, seed=3, split="test")
    counts = {k: sum(p.kind == k for p in prompts) for k in OBJECT_KINDS}
    assert counts == {k: 50 for k in OBJECT_KINDS}
    texts = {p.text for p in all_prompts(WORLD, "objects")["counting"]}
    assert "a photo of two blue squares" in texts
    relations = {p.text for p in all_prompts(WORLD, "objects")["relation"]}
    assert "a photo of a red circle left of a green square" in relations
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
    for p in make_prompt_set(WORLD, "quality", 20, seed=0, split="train"):
        q = corrupt_prompt(WORLD, p, rng)
        assert q.task == "quality" and q.objects[0].colour != p.objects[0].colour
        assert q.text.replace(q.objects[0].colour, p.objects[0].colour) == p.text


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_degrade_is_seeded_and_visible(kind):
    image = render(WORLD, make_prompt_set(WORLD, "objects", 1, 0, "test")[0], np.random.default_rng(0))
    a = degrade(image, np.random.default_rng(3), kind)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, degrade(image, np.random.default_rng(3), kind))
    assert np.abs(a.astype(int) - image).mean() > 5
    with pytest.raises(ValueError):
        degrade(image, np.random.default_rng(0), "jpeg")

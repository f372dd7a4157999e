import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flowopd.rewards import get_reward
from flowopd.rewards.objects import find_objects, label_components, relations_between
from flowopd.rewards.ocr import edit_distance, flow_grpo_ocr_score
from flowopd.rewards.quality import is_single_object, single_object_content
from flowopd.world import (
    SHAPES,
    WorldConfig,
    corrupt_prompt,
    degrade,
    make_prompt_set,
    quality_prompt,
    render,
    sample_prompts,
    text_prompt,
)

WORLD = WorldConfig()


def render_all(prompts, seed=0, flaw=None):
    rng = np.random.default_rng(seed)
    images = [render(WORLD, p, rng) for p in prompts]
    return np.stack([degrade(x, rng, flaw) if flaw else x for x in images])


@pytest.fixture(scope="module")
def text_prompts():
    return make_prompt_set(WORLD, "text", 256, seed=0, split="test")


@pytest.fixture(scope="module")
def object_prompts():
    return make_prompt_set(WORLD, "objects", 256, seed=0, split="test")


def test_registry_contract():
    prompts = sample_prompts(WORLD, np.random.default_rng(0), 300)
    for name, keys in {"ocr": {"score", "exact"}, "objects": {"score", "strict"}, "quality": {"score"}}.items():
        tasks = {"ocr": ("text",), "objects": ("objects", "quality")}.get(name, ("text", "objects", "quality"))
        chosen = [p for p in prompts if p.task in tasks][:24]
        out = get_reward(name)(render_all(chosen), chosen)
        assert keys <= set(out)
        for value in out.values():
            assert value.shape == (24,) and value.dtype == np.float64 and (0 <= value).all() and (value <= 1).all()
    with pytest.raises(KeyError):
        get_reward("aesthetic")
    blank = np.full((2, 32, 32, 3), 255, np.uint8)
    for name, task in (("ocr", "text"), ("objects", "objects")):
        chosen = [p for p in prompts if p.task == task][:2]
        assert get_reward(name)(blank, chosen)["score"].max() == 0.0
    text_prompt = [p for p in prompts if p.task == "text"][:1]
    with pytest.raises(ValueError):
        get_reward("objects")(render_all(text_prompt), text_prompt)


def test_flow_grpo_ocr_rule():
    assert edit_distance("KITTEN", "SITTING") == 3 and edit_distance("", "KO") == 2
    assert flow_grpo_ocr_score("KO", "KO") == 1.0
    assert flow_grpo_ocr_score("XKOA", "KO") == 1.0  # substring counts as read
    assert flow_grpo_ocr_score("K O", "KO") == 1.0  # spaces ignored
    assert flow_grpo_ocr_score("KA", "KO") == 0.5
    assert flow_grpo_ocr_score("", "KO") == 0.0 and flow_grpo_ocr_score("TXAHE", "KO") == 0.0  # clipped at 0


def test_ocr_reads_ground_truth_and_drops_on_flaws(text_prompts):
    ocr = get_reward("ocr")
    clean = ocr(render_all(text_prompts), text_prompts)
    assert clean["score"].mean() >= 0.95 and clean["exact"].mean() >= 0.9
    for flaw in ("noise", "blur"):
        assert ocr(render_all(text_prompts, 1, flaw), text_prompts)["score"].mean() < 0.75, flaw
    rng = np.random.default_rng(1)
    wrong = [corrupt_prompt(WORLD, p, rng) for p in text_prompts]
    assert ocr(render_all(wrong), text_prompts)["score"].mean() < 0.4


def test_objects_checker_on_ground_truth_and_wrong_scenes(object_prompts):
    objects = get_reward("objects")
    clean = objects(render_all(object_prompts), object_prompts)
    assert clean["strict"].mean() >= 0.98 and clean["score"].mean() >= 0.98
    rng = np.random.default_rng(1)
    for kind in ("colour", "count", "relation"):
        chosen = [p for p in object_prompts if (kind == "relation") == bool(p.relation) or kind == "colour"]
        wrong = [corrupt_prompt(WORLD, p, rng, kind) for p in chosen]
        out = objects(render_all(wrong), chosen)
        assert out["strict"].mean() <= 0.05 and out["score"].mean() < 0.7, kind


def test_objects_counts_shapes_and_positions():
    prompts = make_prompt_set(WORLD, "objects", 64, seed=4, split="train")
    for p, found in zip(prompts, find_objects(render_all(prompts), WORLD.colours)):
        expected = sorted((g.colour, g.shape) for g in p.objects for _ in range(g.count))
        assert sorted((o["colour"], o["shape"]) for o in found) == expected
    a, b = {"centre": (8, 16), "size": (10, 10)}, {"centre": (24, 18), "size": (10, 10)}
    assert relations_between(a, b) == {"left of"} and relations_between(b, a) == {"right of"}
    assert relations_between(a, {"centre": (9, 16), "size": (10, 10)}) == set()


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(0)
    masks = rng.random((20, 16, 16)) < 0.45
    labels = label_components(masks)
    for mask, label in zip(masks, labels):
        assert len(np.unique(label[mask])) == flood_fill_count(mask)
        assert (label[~mask] == 0).all()


def flood_fill_count(mask):
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count, stack = count + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
    return count


def test_quality_high_on_ground_truth_and_low_on_flaws():
    prompts = sample_prompts(WORLD, np.random.default_rng(3), 256)
    quality = get_reward("quality")
    clean = quality(render_all(prompts), prompts)["score"]
    assert clean.mean() >= 0.97 and clean.min() >= 0.9
    for flaw in ("noise", "blur"):
        flawed = quality(render_all(prompts, 1, flaw), prompts)["score"]
        assert flawed.mean() < 0.6 and flawed.max() < clean.min(), flaw
    mild = np.clip(render_all(prompts) + np.random.default_rng(0).normal(0, 20, (256, 32, 32, 3)), 0, 255)
    assert 0.5 < quality(mild.astype(np.uint8), prompts)["score"].mean() < 0.9  # graded, not a cliff
    assert quality(np.full((2, 32, 32, 3), 255, np.uint8), prompts[:2])["score"].max() == 0.0  # empty canvas


# ---------------------------------------------------------------- the quality reward reads the prompt
# Worlds whose quality prompts ask for one object: the tests of the single-object content (colour, shape, room).
# spec: specs/flow_opd.yaml's colours, counts and canonical layouts
SINGLE = {"jitter": WorldConfig(quality_families=("single",)),
          "spec": WorldConfig(colours=("red", "green", "blue"), max_count=2, jitter=False,
                              quality_families=("single",))}


def quality_setup(world, n=96):
    prompts = make_prompt_set(world, "quality", n, seed=0, split="train")
    return prompts, np.stack([render(world, p, np.random.default_rng(i)) for i, p in enumerate(prompts)])


def test_quality_pays_only_the_asked_object():
    """The issue's exploits (a black square, the word "OK", a blue square on 'a red circle') scored 1.0, 1.0, 0.667
    when the reward read the image only; the asked render still scores ~1."""
    prompts = [quality_prompt("red", "circle")] * 4
    truth = render(WORLD, prompts[0], np.random.default_rng(0))
    blob = np.full((32, 32, 3), 255, np.uint8)
    blob[11:21, 11:21] = 0
    word = render(WORLD, text_prompt("OK"), np.random.default_rng(0))
    blue_square = render(WORLD, quality_prompt("blue", "square"), np.random.default_rng(0))
    out = get_reward("quality")(np.stack([truth, blob, word, blue_square]), prompts)
    assert out["score"][0] > 0.9 and out["score"][1:].max() < 0.05, out["score"]
    assert (out["finish"] > 0.9).all()  # the image-only terms still call all four clean
    assert {"score", "content", "finish", "background", "sharpness", "palette"} <= set(out)


@pytest.mark.parametrize("world", SINGLE.values(), ids=SINGLE.keys())
def test_quality_ranks_clean_over_flawed_over_wrong_content(world):
    prompts, truth = quality_setup(world)
    quality = get_reward("quality", world)
    clean = quality(truth, prompts)["score"]
    assert clean.mean() >= 0.95 and clean.min() >= 0.9
    rng = np.random.default_rng(1)
    wrong = [corrupt_prompt(world, p, rng, "colour") for p in prompts]
    shapes = world.shapes
    wrong += [quality_prompt(p.objects[0].colour, shapes[(shapes.index(p.objects[0].shape) + k) % len(shapes)])
              for p in prompts for k in (1, 2)]
    wrong_score = quality(np.concatenate([truth, truth.repeat(2, axis=0)]), wrong)["score"]  # scored as other prompts
    assert wrong_score.max() < 0.02  # a wrong shape keeps the floor of the shape term, 0.01
    for flaw in ("noise", "blur"):
        flawed = quality(np.stack([degrade(x, rng, flaw) for x in truth]), prompts)["score"]
        assert flawed.mean() < clean.mean() - 0.5, flaw  # clearly lower than clean...
        assert flawed.min() > wrong_score.max(), flaw  # ...but above every wrong content


def test_quality_is_graded_by_flaw_severity():
    prompts, truth = quality_setup(WORLD, 48)
    quality = get_reward("quality")
    rng = np.random.default_rng(2)
    noisy = [quality(np.clip(truth + rng.normal(0, s, truth.shape), 0, 255).astype(np.uint8), prompts)["score"].mean()
             for s in (0, 10, 20, 40, 60)]
    blurred = [quality(np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(r))) for x in truth]),
                       prompts)["score"].mean() for r in (0.5, 1.0, 1.5, 2.5)]
    assert all(a > b + 0.02 for a, b in itertools.pairwise(noisy)), noisy
    assert noisy[0] > blurred[0] and all(a > b + 0.02 for a, b in itertools.pairwise(blurred)), blurred


def test_quality_content_of_other_prompts_is_their_task_reward():
    prompts = [p for p in sample_prompts(WORLD, np.random.default_rng(5), 60) if not is_single_object(p)][:16]
    images = render_all(prompts)
    rng = np.random.default_rng(3)
    images[::2] = render_all([corrupt_prompt(WORLD, p, rng) for p in prompts[::2]])
    content = get_reward("quality").content(images, prompts)
    for reward, task in (("ocr", "text"), ("objects", "objects")):
        rows = [i for i, p in enumerate(prompts) if p.task == task]
        expected = get_reward(reward)(images[rows], [prompts[i] for i in rows])["score"]
        assert np.array_equal(content[rows], expected) and len(set(expected)) > 1


def test_quality_shape_fit_is_blur_invariant():
    """A blurred render still fits its own template (mass and centroid survive blur); blur is the finish's job."""
    prompts, truth = quality_setup(SINGLE["jitter"], 48)
    rng = np.random.default_rng(4)
    blurred = np.stack([degrade(x, rng, "blur") for x in truth])
    colours = np.array([WORLD.colours.index(p.objects[0].colour) for p in prompts])
    shapes = np.array([SHAPES.index(p.objects[0].shape) for p in prompts])
    sharp, soft = (single_object_content(x, WORLD.colours, colours, shapes) for x in (truth, blurred))
    assert sharp["mismatch"].max() < 0.01 and soft["mismatch"].max() < 0.06 and soft["colour"].min() > 0.95
    assert sharp["shape"].min() > 0.95 and soft["shape"].min() > 0.3  # blur leaves shapes ambiguous, not wrong

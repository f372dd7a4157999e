import numpy as np
import pytest

from flowopd.rewards import get_reward
from flowopd.rewards.objects import find_objects, label_components, relations_between
from flowopd.rewards.ocr import edit_distance, flow_grpo_ocr_score
from flowopd.world import WorldConfig, corrupt_prompt, degrade, make_prompt_set, render, sample_prompts

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

"""The tiny world: a prompt grammar, a ground-truth renderer and controlled flaws for training pairs."""

from flowopd.world.grammar import (
    OBJECT_KINDS,
    PALETTE,
    SHAPES,
    SPLITS,
    TASKS,
    ObjectGroup,
    Prompt,
    WorldConfig,
    all_prompts,
    content_key,
    distinct_contents,
    make_prompt_set,
    objects_prompt,
    quality_prompt,
    quality_scene,
    sample_prompts,
    scene_phrase,
    split_prompts,
    text_prompt,
)
from flowopd.world.render import BAD_MODES, DEGRADATIONS, corrupt_prompt, degrade, render, render_bad_mode

__all__ = [
    "BAD_MODES", "DEGRADATIONS", "OBJECT_KINDS", "PALETTE", "SHAPES", "SPLITS", "TASKS", "ObjectGroup", "Prompt",
    "WorldConfig", "all_prompts", "content_key", "corrupt_prompt", "degrade", "distinct_contents", "make_prompt_set",
    "objects_prompt", "quality_prompt", "quality_scene", "render", "render_bad_mode", "sample_prompts", "scene_phrase",
    "split_prompts", "text_prompt",
]

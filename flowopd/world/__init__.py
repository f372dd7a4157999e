"""The tiny world: a prompt grammar, a ground-truth renderer and controlled flaws for training pairs."""

from flowopd.world.grammar import (
    OBJECT_KINDS,
    PALETTE,
    SHAPES,
    TASKS,
    ObjectGroup,
    Prompt,
    WorldConfig,
    all_prompts,
    make_prompt_set,
    objects_prompt,
    quality_prompt,
    sample_prompts,
    split_prompts,
    text_prompt,
)
from flowopd.world.render import BAD_MODES, DEGRADATIONS, corrupt_prompt, degrade, render, render_bad_mode

__all__ = [
    "BAD_MODES", "DEGRADATIONS", "OBJECT_KINDS", "PALETTE", "SHAPES", "TASKS", "ObjectGroup", "Prompt", "WorldConfig",
    "all_prompts", "corrupt_prompt", "degrade", "make_prompt_set", "objects_prompt", "quality_prompt", "render",
    "render_bad_mode", "sample_prompts", "split_prompts", "text_prompt",
]

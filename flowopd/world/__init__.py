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
from flowopd.world.render import DEGRADATIONS, corrupt_prompt, degrade, render

__all__ = [
    "DEGRADATIONS", "OBJECT_KINDS", "PALETTE", "SHAPES", "TASKS", "ObjectGroup", "Prompt", "WorldConfig",
    "all_prompts", "corrupt_prompt", "degrade", "make_prompt_set", "objects_prompt", "quality_prompt", "render",
    "sample_prompts", "split_prompts", "text_prompt",
]

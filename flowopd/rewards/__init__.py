"""Rewards over generated images: reward(images (N,H,W,3) uint8, prompts) -> {"score": (N,) float64 in [0,1], ...}."""

from typing import Protocol

import numpy as np

from flowopd.rewards.objects import ObjectsReward
from flowopd.rewards.ocr import OCRReward
from flowopd.rewards.quality import QualityReward
from flowopd.world.grammar import Prompt, WorldConfig

REWARDS = {"ocr": OCRReward, "objects": ObjectsReward, "quality": QualityReward}


class Reward(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]: ...


def get_reward(name: str, world: WorldConfig | None = None) -> Reward:
    """The reward called `name` ("ocr" | "objects" | "quality") for a world (default WorldConfig())."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; expected one of {sorted(REWARDS)}")
    return REWARDS[name](world)


__all__ = ["REWARDS", "OCRReward", "ObjectsReward", "QualityReward", "Reward", "get_reward"]

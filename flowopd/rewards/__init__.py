"""Rewards over generated images: reward(images (N,H,W,3) uint8, prompts) -> {"score": (N,) float64, ...}.

"score" is what the trainers optimise; the other keys are extra metrics (Task.metric picks the headline).
The tiny world's rewards (ocr's tiny reader, objects, quality) score in [0, 1]; the GPU-scale ones keep their
native scale (pickscore: CLIP logits, about 20; remote: whatever the server says, e.g. DeQA 1-5).
Rewards that need settings (a model folder, a server) take them from the spec's task: `task_reward(task, world)`.
"""

from typing import Protocol

import numpy as np

from flowopd.rewards.objects import ObjectsReward
from flowopd.rewards.ocr import OCRReward
from flowopd.rewards.pickscore import PickScoreReward
from flowopd.rewards.quality import QualityReward
from flowopd.rewards.remote import RemoteReward, RemoteRewardError
from flowopd.spec.choices import NEEDS_SETTINGS, REWARD_SETTINGS
from flowopd.world.grammar import Prompt, WorldConfig

REWARDS = {"ocr": OCRReward, "objects": ObjectsReward, "quality": QualityReward, "pickscore": PickScoreReward,
           "remote": RemoteReward}


class Reward(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: list[Prompt]) -> dict[str, np.ndarray]: ...


def get_reward(name: str, world: WorldConfig | None = None, settings=None) -> Reward:
    """The reward called `name` for a world (default WorldConfig()).

    settings: the spec's settings of that reward (Task.ocr / .pickscore / .remote): required for pickscore and
    remote; for ocr they switch from the tiny world's reader to the scene reader; objects and quality take none.
    """
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; expected one of {sorted(REWARDS)}")
    if settings is None and name in NEEDS_SETTINGS:
        raise ValueError(f"reward {name!r} needs settings (the spec's tasks.<task>.{name} mapping)")
    if settings is not None and name not in REWARD_SETTINGS:
        raise ValueError(f"reward {name!r} takes no settings")
    if name == "ocr":
        return OCRReward(world, settings)
    if name in NEEDS_SETTINGS:
        return REWARDS[name](settings)
    return REWARDS[name](world)


def task_reward(task, world: WorldConfig | None = None) -> Reward:
    """The reward of a spec Task, with its settings: what a trainer or the evaluation should call."""
    return get_reward(task.reward, world, task.reward_settings())


__all__ = ["REWARDS", "OCRReward", "ObjectsReward", "PickScoreReward", "QualityReward", "RemoteReward",
           "RemoteRewardError", "Reward", "get_reward", "task_reward"]

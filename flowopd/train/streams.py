"""Seeded per-step randomness: step k's draws of random stream s come from (run seed, s, k), nothing else.

So a resumed run draws step k exactly as an uninterrupted one, and several processes draw the whole batch alike.
The streams are registered here, once, so no two draws share one.
"""

from __future__ import annotations

import numpy as np
import torch

PROMPT_STREAM, NOISE_STREAM, TIMESTEP_STREAM = 1, 2, 3  # which prompts, the sampler's noise, which steps train
SFT_SAMPLE_STREAM, SFT_TRAIN_STREAM = 11, 12  # the SFT cold start: the teachers' samples, its batches and noise


# ---------------------------------------------------------------- seeded per-step randomness
def step_seed(seed: int, stream: int, step: int) -> int:
    """An independent 63-bit seed for (run seed, random stream, step): resuming at step k redraws step k alike."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint64)[0] >> 1)


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    return np.random.default_rng(step_seed(seed, stream, step))


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator (sampling draws noise on CPU and moves it, so any device gives the same rollouts)."""
    return torch.Generator().manual_seed(step_seed(seed, stream, step))

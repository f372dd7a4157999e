"""The one interface every model bundle offers: encode prompts, predict a velocity, decode to pixels.

Samplers and trainers see only this, so the tiny CPU world and SD3.5-M share one code path.
Velocity convention (diffusers SD3): x_s = (1 - s) x0 + s e, target v = e - x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@dataclass
class Condition:
    """Encoded prompts, batch first."""

    prompt_embeds: Tensor  # (B, L, D)
    pooled: Tensor  # (B, P)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def index(self, idx) -> Condition:
        return Condition(self.prompt_embeds[idx], self.pooled[idx])

    def repeat_interleave(self, n: int) -> Condition:
        return Condition(self.prompt_embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def to(self, *args, **kwargs) -> Condition:
        return Condition(self.prompt_embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        return Condition(
            torch.cat([c.prompt_embeds for c in conditions]), torch.cat([c.pooled for c in conditions])
        )


@runtime_checkable
class Bundle(Protocol):
    transformer: torch.nn.Module  # a diffusers SD3Transformer2DModel: the trainable part
    latent_shape: tuple[int, int, int]  # (C, H, W) of x

    def encode(self, texts: list[str]) -> Condition: ...

    def null_condition(self, n: int) -> Condition: ...

    def velocity(self, x: Tensor, sigma, cond: Condition, cfg: float = 1.0, transformer=None) -> Tensor: ...

    def decode(self, x: Tensor) -> np.ndarray: ...


def transformer_velocity(transformer, x: Tensor, sigma, cond: Condition, null: Condition | None, cfg: float):
    """v = v_u + cfg (v_c - v_u) in one batched forward of 2B (Ho & Salimans' CFG); plain v when cfg == 1."""
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch)  # fp32: bf16 rounds t
    if cfg == 1.0 or null is None:
        return transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
    both = Condition.cat([null, cond])
    out = transformer(
        hidden_states=torch.cat([x, x]),
        timestep=torch.cat([sigma, sigma]) * 1000,
        encoder_hidden_states=both.prompt_embeds,
        pooled_projections=both.pooled,
        return_dict=False,
    )[0]
    v_uncond, v_cond = out.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)

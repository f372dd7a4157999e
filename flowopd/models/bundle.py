"""The one interface every model bundle offers: encode prompts, predict a velocity, decode to pixels.

Samplers and trainers see only this, so the tiny CPU world and SD3.5-M share one code path.
Velocity convention (diffusers SD3): x_s = (1 - s) x0 + s e, target v = e - x0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from flowopd.runtime.records import tally


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


def embed_and_release(bundle, texts: list[str], batch_size: int | None = None) -> None:
    """A stage's prompts embedded once, then the text encoders freed, on a bundle that caches embeddings (SD3Bundle:
    embed_prompts, release_text_encoders); other bundles encode as they go (the tiny one's encoder is part of the
    trained model). batch_size: prompts per text-encoder call."""
    if hasattr(bundle, "embed_prompts"):
        bundle.embed_prompts(texts, batch_size)
        bundle.release_text_encoders()


def transformer_velocity(transformer, x: Tensor, sigma, cond: Condition, null: Condition | None, cfg: float,
                         detach_uncond: bool = False):
    """v = v_u + cfg (v_c - v_u) in one batched forward of 2B (Ho & Salimans' CFG); plain v when cfg == 1.
    detach_uncond: no gradient through v_u (Flow-GRPO's SD3 training); the values are the same."""
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch)  # fp32: bf16 rounds t
    if cfg == 1.0 or null is None:
        tally("forwards", batch)  # the training budget's forward rows (flowopd.runtime.records.Meter)
        return transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
    both = Condition.cat([null, cond])
    tally("forwards", 2 * batch)
    out = transformer(
        hidden_states=torch.cat([x, x]),
        timestep=torch.cat([sigma, sigma]) * 1000,
        encoder_hidden_states=both.prompt_embeds,
        pooled_projections=both.pooled,
        return_dict=False,
    )[0]
    v_uncond, v_cond = out.chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + cfg * (v_cond - v_uncond)


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_transformer(bundle, dtype: str | None):
    """The transformer a no-grad sampler runs: None (the bundle's own) when `dtype` is None or already the
    transformer's, else a frozen copy in `dtype` (a bundle's velocity casts its inputs to the transformer's dtype and
    returns fp32, so the sampler's state stays fp32)."""
    transformer = getattr(bundle, "transformer", None)  # a test's rendering bundle has none
    if dtype is None or transformer is None or TORCH_DTYPES[dtype] == transformer.dtype:
        return None
    return copy.deepcopy(transformer).to(TORCH_DTYPES[dtype]).eval().requires_grad_(False)


# ---------------------------------------------------------------- micro-batches
def micro_batches(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most `size` rows covering n rows; size None (or >= n): one slice, the whole batch.
    Everything that splits a batch uses this one rule, so a rollout and its recompute split alike."""
    if size is None or size >= n:
        return [slice(0, n)]
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def micro_batched_velocity(bundle, x: Tensor, sigma, cond: Condition, cfg: float = 1.0, transformer=None,
                           size: int | None = None) -> Tensor:
    """bundle.velocity over micro-batches of at most `size` rows (x2 with CFG), concatenated; sigma: a float or
    one per row. One micro-batch is the plain call."""
    parts = micro_batches(len(x), size)
    if len(parts) == 1:
        return bundle.velocity(x, sigma, cond, cfg=cfg, transformer=transformer)
    per_row = isinstance(sigma, Tensor) and sigma.ndim > 0
    return torch.cat([bundle.velocity(x[rows], sigma[rows] if per_row else sigma, cond.index(rows), cfg=cfg,
                                      transformer=transformer) for rows in parts])


def micro_batched_encode(bundle, texts: list[str], size: int | None = None) -> Condition:
    """bundle.encode over batches of at most `size` prompts (T5-XXL's activations grow with the batch)."""
    parts = micro_batches(len(texts), size)
    if len(parts) == 1:
        return bundle.encode(texts)
    return Condition.cat([bundle.encode(texts[rows]) for rows in parts])


def micro_batched_decode(bundle, x: Tensor, size: int | None = None) -> np.ndarray:
    """bundle.decode over micro-batches of at most `size` images (the VAE's activations are large at 512 px)."""
    parts = micro_batches(len(x), size)
    if len(parts) == 1:
        return bundle.decode(x)
    return np.concatenate([bundle.decode(x[rows]) for rows in parts])


def micro_batched_scores(reward, images: np.ndarray, prompts: list, size: int | None = None) -> dict[str, np.ndarray]:
    """reward(images, prompts) (flowopd.rewards) over batches of at most `size` images (a scorer's memory, a
    server's request size), each metric concatenated; size None: one call."""
    parts = micro_batches(len(images), size)
    if len(parts) == 1:
        return reward(images, prompts)
    scored = [reward(images[rows], prompts[rows]) for rows in parts]
    return {metric: np.concatenate([np.asarray(part[metric]) for part in scored]) for metric in scored[0]}

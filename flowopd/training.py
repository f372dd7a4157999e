"""Pieces every trainer shares (GRPO, on-policy distillation, the SFT cold start; the loop is flowopd.trainer).

- the policy: which weights train (all of the transformer, or a peft LoRA adapter), and the frozen reference
  (the adapter switched off, or a frozen copy of the starting transformer);
- per-step log-probs of stored trajectories, recomputed under any transformer (Flow-GRPO's `compute_log_prob`);
- optimiser, EMA of the weights (Flow-GRPO: decay 0.9 every 8 steps, what gets saved and evaluated);
- seeded per-step randomness, so step k draws the same prompts, noise and timesteps whether or not the run was
  interrupted, and checkpoints (weights, optimiser, EMA, RNG states, curve) written atomically beside the output;
- saving the trained policy (tiny: a whole TinyBundle; sd3: the adapter or the transformer).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowopd.sde import gaussian_log_prob, sde_step_mean_std

ADAPTER = "policy"  # name of the trained LoRA adapter
ADAM_WEIGHT_DECAY = 1e-4  # Flow-GRPO's AdamW setting
CHECKPOINT_FILE = "state.pt"
# Random streams, one registry so no two draws share one: step k's draws of stream s come from (seed, s, k).
PROMPT_STREAM, NOISE_STREAM, TIMESTEP_STREAM = 1, 2, 3  # which prompts, the sampler's noise, which steps train
# (flowopd.cold_start's SFT draws from 11 and 12)


# ---------------------------------------------------------------- seeded per-step randomness
def step_seed(seed: int, stream: int, step: int) -> int:
    """An independent 63-bit seed for (run seed, random stream, step): resuming at step k redraws step k alike."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(2, np.uint64)[0] >> 1)


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    return np.random.default_rng(step_seed(seed, stream, step))


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator (sampling draws noise on CPU and moves it, so any device gives the same rollouts)."""
    return torch.Generator().manual_seed(step_seed(seed, stream, step))


# ---------------------------------------------------------------- policy: full fine-tuning or LoRA
def add_lora(bundle, settings, name: str = ADAPTER) -> None:
    """A trainable LoRA adapter on the bundle's transformer, equal to the base at first (B = 0, A gaussian).

    The sd3 bundle has its own `add_lora`; any other bundle with a diffusers transformer gets one through peft.
    Afterwards only the adapter's weights require grad.
    """
    if hasattr(bundle, "add_lora"):
        bundle.add_lora(name, rank=settings.rank, alpha=settings.alpha, target_modules=settings.target_modules,
                        dropout=settings.dropout)
    else:
        from peft import LoraConfig

        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules),
                            lora_dropout=settings.dropout, init_lora_weights="gaussian")
        bundle.transformer.add_adapter(config, adapter_name=name)
    for param_name, param in bundle.transformer.named_parameters():
        param.requires_grad_("lora_" in param_name and f".{name}." in param_name)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def prepare_policy(bundle, lora=None) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but what trains: a new LoRA adapter (LoraSettings) or, with lora None, the whole
    transformer. Returns the trainable parameters by name, as fp32 master weights (the frozen rest may be half
    precision on GPU)."""
    for module in getattr(bundle, "modules", dict)().values():  # tiny: text encoder and transformer
        module.requires_grad_(False)
    if lora is not None:
        add_lora(bundle, lora)
    else:
        bundle.transformer.requires_grad_(True)
    params = trainable_parameters(bundle.transformer)
    for p in params.values():
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def adapters_off(transformer: torch.nn.Module):
    """Run the bare base model; peft's switch also flips requires_grad, so each parameter's flag is restored."""
    flags = {name: p.requires_grad for name, p in transformer.named_parameters()}
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()
        for name, p in transformer.named_parameters():
            p.requires_grad_(flags[name])


class FrozenReference:
    """The starting model as a frozen velocity field, for KL(policy step || reference step).

    LoRA: the policy's own transformer with the adapters switched off (no extra memory).
    Full fine-tuning: a frozen copy of the transformer taken before any update.
    """

    def __init__(self, bundle, lora: bool):
        self.bundle = bundle
        self.copy = None if lora else copy.deepcopy(bundle.transformer).requires_grad_(False).eval()

    @torch.no_grad()
    def velocity(self, x: Tensor, sigma, cond, cfg: float) -> Tensor:
        if self.copy is not None:
            return self.bundle.velocity(x, sigma, cond, cfg=cfg, transformer=self.copy)
        with adapters_off(self.bundle.transformer):
            return self.bundle.velocity(x, sigma, cond, cfg=cfg)


# ---------------------------------------------------------------- per-step log-probs of stored trajectories
def step_log_prob(
    bundle, x: Tensor, x_next: Tensor, sigma: float, sigma_next: float, cond, *, cfg: float, noise_level: float,
    reduction: str, transformer=None, velocity_fn=None, sde: str = "flow",
) -> tuple[Tensor, Tensor, Tensor]:
    """log p(x_next | x) of one SDE step under a model, with the velocity recomputed at the stored x.

    -> (log_prob (B,), mean (B, ...), std (B, 1, ...)). Grad flows when enabled (the policy), not otherwise.
    `velocity_fn(x, sigma, cond, cfg)` replaces the bundle's velocity (e.g. FrozenReference.velocity).
    """
    if velocity_fn is not None:
        velocity = velocity_fn(x, sigma, cond, cfg)
    else:
        velocity = bundle.velocity(x, sigma, cond, cfg=cfg, transformer=transformer)
    mean, std = sde_step_mean_std(x, velocity, sigma, sigma_next, noise_level, sde)  # fp32 inside
    return gaussian_log_prob(x_next, mean, std, reduction), mean, std


# ---------------------------------------------------------------- optimiser and EMA
def make_optimizer(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=ADAM_WEIGHT_DECAY)


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta, applied every `every` steps (Flow-GRPO's EMAModuleWrapper).

    d = min(decay, (1 + k) / (10 + k)) at step k: a short warm-up so the first updates are not dominated by the
    starting weights. Step k updates when (k + 1) % every == 0.
    """

    def __init__(self, params: list[Tensor], decay: float, every: int):
        self.decay, self.every = decay, every
        self.shadow = [p.detach().clone() for p in params]

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, params: list[Tensor], step: int) -> None:
        if (step + 1) % self.every == 0:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - self.current_decay(step))

    @torch.no_grad()
    def copy_to(self, params: list[Tensor]) -> None:
        for shadow, p in zip(self.shadow, params, strict=True):
            p.copy_(shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.every = state["decay"], state["every"]
        self.shadow = [s.clone() for s in state["shadow"]]


# ---------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpoints:
    """The latest training state in one file of a folder outside the (atomic) output folder.

    Saved as a temp file then renamed, so a run killed at any moment (kill -9) leaves the previous checkpoint
    whole. A checkpoint whose fingerprint (what the run depends on) differs is ignored, not resumed.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.path = self.folder / CHECKPOINT_FILE

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)  # our own file: RNG states inside
        if state.get("fingerprint") != self.fingerprint:
            print(f"note: {self.path} is from other settings or inputs; starting from scratch")
            return None
        return state

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        with open(temp, "wb") as handle:
            torch.save({**state, "fingerprint": self.fingerprint}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_folder(out: Path) -> Path:
    """`<out>.ckpt` beside the output folder (atomic_folder replaces `out` whole, so it cannot live inside)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


# ---------------------------------------------------------------- saving the trained policy
def merged_transformer_state(transformer: torch.nn.Module) -> dict[str, Tensor]:
    """The transformer's weights with any LoRA adapter folded in (W + scale B A), under the base model's keys."""
    if not getattr(transformer, "peft_config", None):
        return transformer.state_dict()
    merged = copy.deepcopy(transformer)
    merged.fuse_lora()
    merged.unload_lora()
    return merged.state_dict()


def save_policy(bundle, folder: Path, lora) -> Path:
    """Write the current weights of the bundle as a model artifact; returns the main weights file.

    tiny: a whole TinyBundle (model.safetensors + model_config.json, LoRA merged), loadable by TinyBundle.load.
    sd3 with LoRA: the adapter (adapter.safetensors + adapter.json); sd3 full: transformer/ (save_pretrained).
    """

    from flowopd.models.tiny import TinyBundle

    folder = Path(folder)
    if isinstance(bundle, TinyBundle):
        clean = TinyBundle(bundle.config)
        state = {f"text_encoder.{k}": v for k, v in bundle.text_encoder.state_dict().items()}
        state |= {f"transformer.{k}": v for k, v in merged_transformer_state(bundle.transformer).items()}
        clean.load_state_dict(state)
        clean.save(folder)
        return folder / "model.safetensors"
    if lora is not None:
        return bundle.save_adapter(ADAPTER, folder, lora.model_dump(mode="json"))
    bundle.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder / "transformer" / "diffusion_pytorch_model.safetensors"

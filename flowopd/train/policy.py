"""The trained policy: which weights train (all of the transformer, or a peft LoRA adapter), the frozen reference
(the adapter switched off, or a frozen copy of the starting transformer), per-step log-probs of stored trajectories
recomputed under any transformer (Flow-GRPO's `compute_log_prob`), the optimiser, and saving the result (tiny: a
whole TinyBundle; sd3: the adapter or the transformer).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import Tensor

from flowopd.flow.sde import gaussian_log_prob, sde_step_mean_std

ADAPTER = "policy"  # name of the trained LoRA adapter
ADAM_WEIGHT_DECAY = 1e-4  # Flow-GRPO's AdamW setting


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


def enable_gradient_checkpointing(transformer) -> None:
    """diffusers' activation checkpointing: each block's activations are recomputed in the backward pass, so a
    forward with gradients holds about one block's instead of every block's."""
    if not hasattr(transformer, "enable_gradient_checkpointing"):
        raise ValueError(f"gradient_checkpointing: {type(transformer).__name__} does not support it")
    transformer.enable_gradient_checkpointing()


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

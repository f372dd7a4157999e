"""The SD3 bundle: StableDiffusion3Pipeline components (SD3.5 Medium at scale) behind the Bundle protocol.

Latents live in the VAE's normalised space, as in diffusers' SD3 pipeline: x = (z - shift) * scaling, so
decode computes z = x / scaling + shift before vae.decode. Prompts go through the pipeline's own encode_prompt
(CLIP-L + CLIP-G + T5). LoRA adapters come from peft; several adapters (teachers, anchor, student) live on one
frozen base transformer and the active one is switched per routed group (`set_adapter`).

Memory hygiene: a stage embeds its prompts once (`embed_prompts`, kept on the host by prompt text), then frees the
three text encoders (`release_text_encoders`, about 10 GB in bf16 at SD3.5-M's size); `encode` then serves the cache.
"""

from __future__ import annotations

import contextlib
import gc
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from flowopd.models.bundle import Condition, micro_batches, transformer_velocity
from flowopd.runtime.launch import resume_gc

resume_gc()  # the heavy imports are done; a stage entry point paused the collector for them

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"  # an sd3 model artifact: one adapter

# Flow-GRPO's LoRA targets for SD3: the joint attention's image and text projections.
SD3_LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


class SD3Bundle:
    """Bundle protocol (models.base) over StableDiffusion3Pipeline components; encoders, VAE frozen"""

    def __init__(self, pipe: StableDiffusion3Pipeline, resolution: int = 512, max_sequence_length: int = 256):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.max_sequence_length = max_sequence_length
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
            if module is not None:
                module.requires_grad_(False).eval()
        self.resolution = resolution
        self._null: Condition | None = None
        self._embedded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # text -> (embeds, pooled), on the host
        self.text_encoders_released = False
        self.detach_uncond = False  # the trainer sets it from sampler.uncond_grad

    @property
    def resolution(self) -> int:
        return self._resolution

    @resolution.setter
    def resolution(self, pixels: int):
        factor = self.pipe.vae_scale_factor * self.transformer.config.patch_size
        if pixels % factor:
            raise ValueError(f"resolution {pixels} must be a multiple of {factor} (VAE factor x patch size)")
        self._resolution = pixels
        side = pixels // self.pipe.vae_scale_factor
        self.latent_shape = (self.transformer.config.in_channels, side, side)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, revision: str | None = None, dtype: torch.dtype = torch.float32, **kwargs
    ) -> SD3Bundle:
        """Components from a local folder or hub id (e.g. stabilityai/stable-diffusion-3.5-medium)."""
        pipe = StableDiffusion3Pipeline.from_pretrained(path_or_id, revision=revision, torch_dtype=dtype)
        return cls(pipe, **kwargs)

    @classmethod
    def from_components(
        cls,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        **kwargs,
    ) -> SD3Bundle:
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        return cls(pipe, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device) -> SD3Bundle:
        self.pipe.to(device)
        self._null = None
        return self

    # -- Bundle protocol -------------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> Condition:
        """(B, 77 + max_sequence_length, D) token embeddings and (B, P) pooled CLIP embeddings on the device; no grad.
        From the cache when every text was embedded (embed_prompts), else from the text encoders."""
        texts = list(texts)
        if all(text in self._embedded for text in texts):
            rows = [self._embedded[text] for text in texts]
            return Condition(torch.stack([embeds for embeds, _ in rows]),
                             torch.stack([pooled for _, pooled in rows])).to(self.device)
        if self.text_encoders_released:
            missing = next(text for text in texts if text not in self._embedded)
            raise RuntimeError(f"prompt {missing!r} was not embedded before the text encoders were released: pass "
                               "every prompt of the stage to embed_prompts first")
        return self._run_text_encoders(texts)

    def embed_prompts(self, texts: list[str], batch_size: int | None = None) -> None:
        """Embed each text not embedded yet (and "", the unconditional prompt, in a call of its own as null_condition
        encodes it), `batch_size` prompts per text-encoder call (None: all at once), and keep the embeddings on the
        host: ~1.7 MB a prompt at SD3.5-M's width, 128 T5 tokens and 16-bit weights."""
        new = [text for text in dict.fromkeys(texts) if text not in self._embedded and text != ""]
        calls = [new[part] for part in micro_batches(len(new), batch_size) if part.stop > part.start]
        if "" not in self._embedded:
            calls.insert(0, [""])
        if calls and self.text_encoders_released:
            raise RuntimeError(f"prompts to embed (e.g. {calls[0][0]!r}), but the text encoders were released")
        for call in calls:
            cond = self._run_text_encoders(call).to("cpu")
            for text, embeds, pooled in zip(call, cond.prompt_embeds, cond.pooled):
                self._embedded[text] = (embeds, pooled)

    def release_text_encoders(self) -> None:
        """Free CLIP-L, CLIP-G and T5 (their weights leave the device and the process); from now on `encode` takes
        only prompts embed_prompts has embedded, and raises on any other."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)
        self.text_encoders_released = True
        gc.collect()  # the weights go now, not at the collector's next pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _run_text_encoders(self, texts: list[str]) -> Condition:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(texts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Condition(prompt_embeds=prompt_embeds, pooled=pooled)

    def null_condition(self, n: int) -> Condition:
        """The empty prompt, encoded once: SD3's unconditional branch for CFG."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null.repeat_interleave(n)

    def velocity(self, x, sigma, cond: Condition, cfg: float = 1.0, transformer=None) -> torch.Tensor:
        """v = v_u + cfg (v_c - v_u), one batched forward of 2B, in the transformer's dtype; returns fp32."""
        transformer = transformer if transformer is not None else self.transformer
        dtype = transformer.dtype
        null = self.null_condition(x.shape[0]).to(dtype=dtype) if cfg != 1.0 else None
        v = transformer_velocity(transformer, x.to(dtype), sigma, cond.to(dtype=dtype), null, cfg,
                                 self.detach_uncond)
        return v.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3), as the pipeline's postprocess does."""
        config = self.vae.config
        latents = x.float() / config.scaling_factor + (config.shift_factor or 0.0)
        images = self.vae.decode(latents.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
        images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    # -- LoRA adapters on one frozen base --------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.transformer, "peft_config", {}))

    def _keep_requires_grad(self, switch) -> None:
        """peft marks only the active adapter trainable on every switch; keep each adapter's own setting."""
        before = {name: p.requires_grad for name, p in self.transformer.named_parameters() if "lora_" in name}
        switch()
        for name, p in self.transformer.named_parameters():
            if name in before:
                p.requires_grad_(before[name])

    def add_lora(
        self,
        name: str,
        rank: int = 32,
        alpha: float = 64,
        target_modules=SD3_LORA_TARGETS,
        dropout: float = 0.0,
        trainable: bool = True,
    ) -> None:
        """A new active adapter, equal to the base at first (B = 0, A gaussian as in Flow-GRPO).

        peft freezes the base; the adapter's parameters are trainable unless trainable=False.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(target_modules),
            lora_dropout=dropout,
            init_lora_weights="gaussian",
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self._keep_requires_grad(lambda: self.transformer.add_adapter(config, adapter_name=name))
        for param_name, p in self.transformer.named_parameters():
            if f".{name}." in param_name and "lora_" in param_name:
                p.requires_grad_(trainable)

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter; None runs the bare base model (e.g. the KL reference)."""
        if name is None:
            if self.adapters:  # no adapters at all: the base runs already
                self._keep_requires_grad(self.transformer.disable_adapters)
            return
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {self.adapters}")
        self._keep_requires_grad(
            lambda: (self.transformer.enable_adapters(), self.transformer.set_adapter(name))
        )

    @property
    def active_adapter(self) -> str | None:
        """The adapter the transformer runs now; None: the bare base (no adapters, or adapters disabled)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                if module.disable_adapters:
                    return None
                active = module.active_adapters
                return active[0] if active else None
        return None

    @contextlib.contextmanager
    def using_adapter(self, name: str | None):
        """Run the block with adapter `name` active (None: the bare base), then restore the previous one."""
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            self.set_adapter(previous)

    def adapter_velocity(self, name: str | None):
        """velocity(x, sigma, cond, cfg=1.0) of one adapter (None: the bare base) as its own velocity field.

        The memory plan: student, teachers and the MAR anchor as LoRA adapters on ONE frozen base instead of a full
        transformer copy each (the reference code's cost: ~4.9 GB bf16 per SD3.5-M copy against ~38 MB per r-32
        adapter, see benchmarks/bench_memory.py). Each call activates `name`, runs the bundle's velocity and
        restores the previously active adapter, so the student's adapter stays active (and trainable) between the
        teacher's and anchor's evaluations. Autograd is untouched: a velocity computed under the student's
        adapter keeps its graph after the switch; under a frozen adapter or the base it simply has no trainable
        inputs. Not thread-safe (one active adapter per transformer).
        """
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {self.adapters}")

        def velocity(x, sigma, cond: Condition, cfg: float = 1.0) -> torch.Tensor:
            with self.using_adapter(name):
                return self.velocity(x, sigma, cond, cfg)

        velocity.adapter = name
        return velocity

    def adapter_bundle(self, name: str | None) -> AdapterBundle:
        """One adapter (None: the bare base) as a bundle of its own, for code that samples a bundle."""
        self.adapter_velocity(name)  # checks the name
        return AdapterBundle(self, name)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.transformer, adapter_name=name)

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by adapter_state_dict into the existing adapter `name`; every key must match."""
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter {name!r}: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
            )

    # -- adapters as artifacts (read_adapter / write_adapter) -------------------------------------------------
    def save_adapter(self, name: str, folder: Path, config: dict) -> Path:
        """Write adapter `name` and its LoRA settings (rank, alpha, target_modules, dropout); -> the weights file."""
        return write_adapter(folder, self.adapter_state_dict(name), config)

    def load_adapter(self, name: str, folder: Path, trainable: bool = False) -> dict:
        """Add adapter `name` from an artifact folder written by save_adapter; -> its LoRA settings."""
        state, config = read_adapter(folder)
        self.add_lora(name, rank=config["rank"], alpha=config["alpha"], target_modules=config["target_modules"],
                      dropout=config.get("dropout", 0.0), trainable=trainable)
        self.load_adapter_state_dict(name, {k: v.to(self.device) for k, v in state.items()})
        return config


class AdapterBundle:
    """An SD3Bundle seen through one of its adapters: encode, decode and latent_shape are the bundle's; velocity runs
    with the adapter active and restores the previous one (SD3Bundle.using_adapter)."""

    def __init__(self, bundle: SD3Bundle, name: str | None):
        self.bundle, self.name, self.latent_shape = bundle, name, bundle.latent_shape

    def encode(self, texts: list[str]) -> Condition:
        return self.bundle.encode(texts)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return self.bundle.decode(x)

    def velocity(self, x, sigma, cond: Condition, cfg: float = 1.0, transformer=None) -> torch.Tensor:
        with self.bundle.using_adapter(self.name):
            return self.bundle.velocity(x, sigma, cond, cfg, transformer)


def write_adapter(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """An sd3 model artifact: adapter.safetensors (peft keys without the adapter's name) + adapter.json."""
    folder = Path(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder / ADAPTER_WEIGHTS


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_WEIGHTS}: not an sd3 adapter artifact")
    return load_file(folder / ADAPTER_WEIGHTS), json.loads((folder / ADAPTER_CONFIG).read_text())

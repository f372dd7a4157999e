"""The tiny bundle: pixel-space SD3 transformer plus a small text encoder, trainable on 2 CPU cores.

Pixels live in [-1, 1] (decode is the identity up to scaling), so rewards read exactly what the model drew.
Tokens are lower-case words and single capital letters: the `text` task needs letters ('"KO"' -> '"', 'K', 'O', '"'),
the rest of the prompt reads fastest as words (a byte-level encoder learned the same mapping several times slower
on 2 cores). The encoder is trained with the transformer during base pretraining and frozen afterwards, as SD3's are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from flowopd.models.bundle import Condition, transformer_velocity
from flowopd.runtime.launch import resume_gc

resume_gc()  # the heavy imports are done; a stage entry point paused the collector for them

SPECIALS = ("<bos>", "<pad>", "<unk>")
TOKEN = re.compile(r"[a-z]+|[A-Z0-9]|[^\sa-zA-Z0-9]")


def split_tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def build_vocab(texts) -> list[str]:
    """Special tokens, then every token of the corpus in sorted order (deterministic)."""
    return [*SPECIALS, *sorted({token for text in texts for token in split_tokens(text)})]


class TextEncoder(nn.Module):
    """Tokens -> (sequence embeddings, pooled embedding). A small pre-norm transformer encoder."""

    def __init__(self, vocab: list[str], dim: int = 128, layers: int = 2, heads: int = 4, max_len: int = 16):
        super().__init__()
        self.max_len = max_len
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.tokens = nn.Embedding(len(vocab), dim)
        self.positions = nn.Parameter(torch.zeros(1, max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.positions, std=1.0)  # as strong as the token embeddings: word order matters

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        bos, pad, unk = (self.ids[s] for s in SPECIALS)
        ids = torch.full((len(texts), self.max_len), pad, dtype=torch.long)
        for row, text in enumerate(texts):
            data = [bos, *(self.ids.get(token, unk) for token in split_tokens(text))]
            if len(data) > self.max_len:
                raise ValueError(f"prompt longer than model.max_text_len={self.max_len - 1} tokens: {text!r}")
            ids[row, : len(data)] = torch.tensor(data)
        return ids

    def forward(self, ids: torch.Tensor) -> Condition:
        hidden = self.norm(self.encoder(self.tokens(ids) + self.positions))
        return Condition(prompt_embeds=hidden, pooled=hidden[:, 0])  # BOS token as the pooled summary


class TinyBundle:
    """Bundle protocol (flowopd.models.bundle) over a pixel-space SD3 transformer."""

    def __init__(self, config: dict):
        self.config = dict(config)
        canvas, patch = config["canvas"], config["patch_size"]
        dim = config["text_dim"]
        self.latent_shape = (3, canvas, canvas)
        self.text_encoder = TextEncoder(
            config["vocab"], dim, config["text_layers"], config["num_heads"], config["max_text_len"]
        )
        self.transformer = SD3Transformer2DModel(
            sample_size=canvas,
            patch_size=patch,
            in_channels=3,
            out_channels=3,
            num_layers=config["num_layers"],
            attention_head_dim=config["head_dim"],
            num_attention_heads=config["num_heads"],
            joint_attention_dim=dim,
            caption_projection_dim=config["num_heads"] * config["head_dim"],
            pooled_projection_dim=dim,
            pos_embed_max_size=canvas // patch,
            qk_norm="rms_norm",
        )
        self._null: Condition | None = None
        self.detach_uncond = False  # the trainer sets it from sampler.uncond_grad

    # -- Bundle protocol -------------------------------------------------------------------------------------
    def encode(self, texts: list[str], grad: bool = False) -> Condition:
        with torch.set_grad_enabled(grad):
            return self.text_encoder(self.text_encoder.tokenize(texts))

    def null_condition(self, n: int) -> Condition:
        if self._null is None or self.text_encoder.training:
            self._null = self.encode([""])
        return self._null.repeat_interleave(n)

    def velocity(self, x, sigma, cond: Condition, cfg: float = 1.0, transformer=None):
        """In the transformer's dtype (a bf16 copy samples the evaluation: flowopd.evaluation.benchmark); fp32 out."""
        transformer = transformer or self.transformer
        dtype = transformer.dtype
        null = self.null_condition(x.shape[0]).to(dtype=dtype) if cfg != 1.0 else None
        v = transformer_velocity(transformer, x.to(dtype), sigma, cond.to(dtype=dtype), null, cfg, self.detach_uncond)
        return v.float()

    def decode(self, x: torch.Tensor) -> np.ndarray:
        pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    # -- pixels <-> model space, save/load -------------------------------------------------------------------
    @staticmethod
    def to_model_space(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "transformer": self.transformer}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, m in self.modules().items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in self.modules().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self._null = None

    def parameter_count(self) -> int:
        return sum(p.numel() for m in self.modules().values() for p in m.parameters())

    def eval(self) -> TinyBundle:
        for module in self.modules().values():
            module.eval()
        self._null = None
        return self

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "model_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TinyBundle:
        folder = Path(folder)
        bundle = cls(json.loads((folder / "model_config.json").read_text()))
        bundle.load_state_dict(load_file(folder / "model.safetensors"))
        return bundle.eval()

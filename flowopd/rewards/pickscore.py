"""PickScore reward (Kirstain et al. 2023, "Pick-a-Pic"): human preference as a CLIP similarity.

score = exp(logit_scale) * cos(E_image(x), E_text(prompt)), i.e. the diagonal of CLIP's logits_per_image, as
Flow-GRPO's PickScoreScorer computes it with yuvalkirstain/PickScore_v1 (a fine-tuned CLIP-ViT-H-14) and the
processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. Unlike Flow-GRPO's training reward (which divides by 26), the
raw value is returned, as the paper reports it (SD3.5-M: 21.64); the spec's `normaliser: 26` scales it for Avg, and
group-normalised advantages do not care about the scale.

Weights come from a folder (or a hub id when online): the model through transformers' CLIPModel, the processor
(tokenizer + image processor) through CLIPProcessor, from `processor` or else the model folder.
"""

from __future__ import annotations

import numpy as np

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class PickScoreReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {"score": (N,) float64}, scored in batches of settings.batch_size."""

    name = "pickscore"

    def __init__(self, settings, device: str | None = None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, DTYPES[settings.dtype])
        try:
            self.processor = CLIPProcessor.from_pretrained(settings.processor or settings.model)
            self.model = CLIPModel.from_pretrained(settings.model, dtype=dtype)
        except (OSError, ValueError) as err:  # ValueError: huggingface_hub refuses a missing path as a repo id
            raise OSError(f"pickscore: cannot load CLIP from {settings.model!r} "
                          f"(processor {settings.processor or settings.model!r}): {err}") from None
        self.model.requires_grad_(False).eval().to(self.device)

    def __call__(self, images: np.ndarray, prompts) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        images = np.asarray(images)
        if len(images) != len(prompts):
            raise ValueError(f"pickscore: {len(images)} images but {len(prompts)} prompts")
        texts = [p if isinstance(p, str) else p.text for p in prompts]
        scores = []
        step = self.settings.batch_size
        for start in range(0, len(images), step):
            pictures = [Image.fromarray(x) for x in images[start : start + step]]
            inputs = self.processor(text=texts[start : start + step], images=pictures, padding=True,
                                    truncation=True, max_length=77, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.no_grad():
                logits = self.model(**inputs).logits_per_image  # (images, texts): logit_scale * cosine
            scores.append(logits.diagonal().float().cpu().numpy())
        return {"score": np.concatenate(scores).astype(np.float64)}

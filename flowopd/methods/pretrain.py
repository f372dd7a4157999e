"""Base phase: flow-matching pretraining of the tiny model on rendered (prompt, image) pairs.

The base must be mediocre, like SD3.5-M in the paper (GenEval .63, OCR .59), so teachers have room. Two knobs:
the step budget (the shipped spec stops well before convergence, and lands near OCR .56 / object strict .53), and
flawed pairs: a share `base.label_noise[task]` shows a wrong word / colour / count for its prompt, a share
`base.flaws` of renders carries noise or blur. On CPU the same spec and seed give bit-identical weights.

Loss (rectified flow / SD3): x_s = (1 - s) x0 + s e,  L = || v_theta(x_s, s, c) - (e - x0) ||^2,
s ~ logit-normal(0, 1) (Esser et al. 2024, eq. 19).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from flowopd.models.tiny import TinyBundle, build_vocab
from flowopd.runtime.records import tally
from flowopd.world import (
    TASKS,
    WorldConfig,
    all_prompts,
    corrupt_prompt,
    degrade,
    render,
    render_bad_mode,
    split_prompts,
)
from flowopd.world.prompt_sets import world_config


def tiny_model_config(spec) -> dict:
    """Bundle config: the spec's model section, the canvas, and the vocabulary of the world's whole grammar."""
    config = spec.model.model_dump(mode="json")
    config.pop("kind")
    world = world_config(spec)
    texts = [p.text for task in TASKS for family in all_prompts(world, task).values() for p in family]
    return {"canvas": world.canvas, "vocab": build_vocab(texts), **config}


def sample_training_prompts(world: WorldConfig, task_mix: dict[str, float], rng: np.random.Generator, n: int,
                            content: str = "train"):
    """Every wording of the training split's content (`content` "train": no validation or test content, whatever
    the wording, flowopd.world.grammar) or of the whole grammar ("all"): task by `task_mix`, then family uniform,
    then prompt uniform."""
    tasks = [t for t in TASKS if task_mix.get(t, 0) > 0]
    weights = np.array([task_mix[t] for t in tasks], dtype=float)
    grammar = {t: list((split_prompts(world, t, "train") if content == "train" else all_prompts(world, t)).values())
               for t in tasks}
    prompts = []
    for task in rng.choice(len(tasks), size=n, p=weights / weights.sum()):
        families = grammar[tasks[task]]
        family = families[rng.integers(len(families))]
        prompts.append(family[rng.integers(len(family))])
    return prompts


def make_training_pairs(spec, n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray, dict]:
    """Prompts, their (possibly flawed) renders, and {pair index: bad-mode render} for the pairs drawn into their
    task's bad mode (base.bad_modes). Without base.bad_modes_from those pairs show the bad mode from the start (their
    entry in `images` is the bad render too); with it, `images` holds their clean render until that step."""
    world, base = world_config(spec), spec.base
    prompts = sample_training_prompts(world, base.task_mix, rng, n, base.content)
    images = np.empty((n, world.canvas, world.canvas, 3), dtype=np.uint8)
    bad: dict[int, np.ndarray] = {}
    flaw_kinds = list(base.flaws)
    flaw_edges = np.cumsum([base.flaws[k] for k in flaw_kinds])  # exclusive flaws: one uniform draw picks one
    for i, prompt in enumerate(prompts):
        shown = prompt
        if rng.random() < base.label_noise.get(prompt.task, 0.0):
            shown = corrupt_prompt(world, prompt, rng)
        share = base.bad_modes.get(prompt.task, 0.0)
        if share > 0 and rng.random() < share:  # no draw without bad modes: older specs keep their pairs
            bad[i] = render_bad_mode(world, shown, rng)
            images[i] = bad[i] if base.bad_modes_from is None else render(world, shown, rng)
            continue
        image = render(world, shown, rng)
        u = rng.random()
        for kind, edge in zip(flaw_kinds, flaw_edges):
            if u < edge:
                image = degrade(image, rng, kind)
                break
        images[i] = image
    return [p.text for p in prompts], images, bad


def lr_at(step: int, base) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak by the last step."""
    if step < base.warmup:
        return base.lr * (step + 1) / base.warmup
    progress = (step - base.warmup) / max(1, base.steps - base.warmup)
    return base.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(spec, progress: bool = True) -> tuple[TinyBundle, list[dict]]:
    """Train the base bundle; returns it (in eval mode) and the loss curve."""
    base = spec.base
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    bundle = TinyBundle(tiny_model_config(spec))
    texts, images, bad = make_training_pairs(spec, base.dataset_size, rng)
    pixels = TinyBundle.to_model_space(images)
    late_pixels = pixels  # what the batches show from step base.bad_modes_from on
    if base.bad_modes_from is not None and bad:
        late_pixels = pixels.clone()
        rows = sorted(bad)
        late_pixels[rows] = TinyBundle.to_model_space(np.stack([bad[i] for i in rows]))
    params = [p for m in bundle.modules().values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=base.lr, weight_decay=base.weight_decay)
    ema = EMA(params, base.ema_decay)
    generator = torch.Generator().manual_seed(spec.seed)
    curve: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(base.steps), desc="base", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(texts), (base.batch_size,), generator=generator)
        drop = torch.rand(base.batch_size, generator=generator) < base.cfg_dropout
        batch_texts = ["" if d else texts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        late = base.bad_modes_from is not None and step >= base.bad_modes_from
        x0 = (late_pixels if late else pixels)[idx]
        noise = torch.randn(x0.shape, generator=generator)
        if base.time_sampling == "logit_normal":
            sigma = torch.sigmoid(torch.randn(base.batch_size, generator=generator))
        else:
            sigma = torch.rand(base.batch_size, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        x_s = (1 - s) * x0 + s * noise
        cond = bundle.encode(batch_texts, grad=True)
        v = bundle.velocity(x_s, sigma, cond)
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        tally("optimizer_steps")
        ema.update(params)
        curve.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    return bundle.eval(), curve


class EMA:
    """Exponential moving average of the weights (what gets saved): theta_ema <- d theta_ema + (1 - d) theta."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        for shadow, p in zip(self.shadow, params):
            p.copy_(shadow)

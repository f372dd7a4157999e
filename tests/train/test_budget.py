"""Training budgets: a Meter counts what a trainer really did (checked against counts taken independently, at the
transformer module and the optimizer), changes no weight, and a resumed run's budget counts the killed run's steps."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from flowopd.methods.grpo import GRPOTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.runtime.records import Meter
from flowopd.spec import EmaSettings, GRPOSettings, SamplerSettings, load_spec
from flowopd.train.state import Checkpoints
from flowopd.train.trainer import train
from flowopd.world import make_prompt_set
from flowopd.world.grammar import WorldConfig

MICRO = Path(__file__).parents[1] / "data" / "micro.yaml"
# CFG 3 (two rows per sample in every forward), a reference copy for the KL, two inner epochs: every kind of forward
SETTINGS = GRPOSettings(group_size=2, prompts_per_step=2, steps=2, lr=1e-3, beta=0.01, inner_epochs=2,
                        sampler=SamplerSettings(steps=3, shift=3.0, noise_level=0.7, cfg=3.0), ema=EmaSettings(every=1))


class Brightness:
    name = "brightness"

    def __call__(self, images, prompts):
        return {"score": images.reshape(len(images), -1).mean(1) / 255.0}


@pytest.fixture(scope="module")
def fresh_trainer():
    spec = load_spec(MICRO)
    torch.manual_seed(0)
    state = TinyBundle(tiny_model_config(spec)).eval().state_dict()
    prompts = make_prompt_set(WorldConfig(), "quality", 8, 0, "train")

    def make(settings=SETTINGS):
        bundle = TinyBundle(tiny_model_config(spec))
        bundle.load_state_dict(state)
        return GRPOTrainer(bundle.eval(), settings, prompts, np.zeros(len(prompts), dtype=int), [Brightness()],
                           ["brightness"], [1.0], seed=0)
    return make


def test_counts_match_an_independent_count_and_the_weights_stay_bit_identical(fresh_trainer, monkeypatch):
    rows = []
    original = SD3Transformer2DModel.forward

    def forward(self, *args, **kwargs):  # the independent count reads the batch the module really gets
        rows.append(kwargs["hidden_states"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", forward)
    metered = fresh_trainer()
    steps = []
    metered.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    images = []
    rollout = metered.rollout

    def counted(step):
        drawn = rollout(step)
        images.append(drawn.trajectory.latents.shape[1])
        return drawn

    metered.rollout = counted
    meter = Meter()
    train(metered, SETTINGS.steps, progress=False)
    spent = meter.spent()
    assert spent["images"] == sum(images) == SETTINGS.steps * SETTINGS.prompts_per_step * SETTINGS.group_size
    assert spent["forwards"] == sum(rows) > spent["images"] * SETTINGS.sampler.steps  # rollouts plus the updates
    assert spent["optimizer_steps"] == len(steps) == SETTINGS.steps * SETTINGS.inner_epochs
    assert spent["cpu_s"] > 0
    del meter

    bare = fresh_trainer()  # no meter alive: nothing is counted
    train(bare, SETTINGS.steps, progress=False)
    for a, b in zip(metered.params, bare.params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(metered.ema.shadow, bare.ema.shadow, strict=True):
        assert torch.equal(a, b)


class Interrupt(Exception):
    pass


def test_a_resumed_run_counts_what_the_killed_run_spent(tmp_path, fresh_trainer):
    settings = SETTINGS.model_copy(update={"steps": 3, "inner_epochs": 1})
    straight = Meter()
    train(fresh_trainer(settings), 3, progress=False, meter=straight)
    expected = straight.spent()
    del straight

    checkpoints = Checkpoints(tmp_path / "ckpt", "fingerprint")

    def stop(step):
        if step == 1:
            raise Interrupt

    killed = Meter()
    with pytest.raises(Interrupt):
        train(fresh_trainer(settings), 3, checkpoints, checkpoint_every=1, progress=False, on_step=stop, meter=killed)
    del killed
    assert torch.load(checkpoints.path, weights_only=True)["budget"]["optimizer_steps"] == 2
    resumed = Meter()
    train(fresh_trainer(settings), 3, checkpoints, checkpoint_every=1, progress=False, meter=resumed)
    spent = resumed.spent()
    assert {k: spent[k] for k in ("images", "forwards", "optimizer_steps")} == \
        {k: expected[k] for k in ("images", "forwards", "optimizer_steps")}


def test_a_checkpoint_from_before_budgets_leaves_the_budget_unknown(tmp_path, fresh_trainer):
    settings = SETTINGS.model_copy(update={"steps": 2, "inner_epochs": 1})
    checkpoints = Checkpoints(tmp_path / "ckpt", "fingerprint")
    trainer = fresh_trainer(settings)
    train(trainer, 1, progress=False)
    checkpoints.save({"trainer": trainer.state_dict(), "curve": [], "step": 1, "seconds": 0.0})  # no "budget"
    meter = Meter()
    train(fresh_trainer(settings), 2, checkpoints, checkpoint_every=1, progress=False, meter=meter)
    assert meter.spent() is None

"""SD3 memory hygiene on the tiny random SD3: prompts embedded once and kept on the host, the text encoders freed
afterwards, a rollout that encodes only its process's prompts, and decodes of at most decode_batch images."""

import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_sd3 import tiny_sd3_bundle

from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.bundle import embed_and_release, micro_batched_decode
from flowopd.models.tiny import TinyBundle
from flowopd.runtime.processes import Processes
from flowopd.spec import SamplerSettings, load_spec
from flowopd.train.rollouts import draw_rollout, rollout_texts
from flowopd.world.grammar import text_prompt

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
TEXTS = ['a sign that says "KO"', "a photo of a red circle", "two blue squares", 'a poster that says "HI"']


def rows_seen(module: torch.nn.Module) -> list[int]:
    """The batch size of every call of `module` from now on."""
    seen = []
    module.register_forward_hook(lambda _, args, kwargs, out: seen.append(
        (args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)
    return seen


def fake_processes(index: int, count: int) -> Processes:
    return Processes(SimpleNamespace(num_processes=count, process_index=index, device=torch.device("cpu")))


@pytest.mark.parametrize("device", DEVICES)
def test_embeddings_are_cached_on_the_host_and_equal_fresh_ones(device):
    bundle = tiny_sd3_bundle().to(device)
    fresh = bundle.encode(TEXTS)
    t5_rows = rows_seen(bundle.pipe.text_encoder_3)
    bundle.embed_prompts(TEXTS + TEXTS[:1], batch_size=2)
    assert t5_rows == [1, 2, 2]  # "" alone (as null_condition encodes it), then the 4 distinct prompts, 2 a call
    assert all(embeds.device.type == "cpu" and pooled.device.type == "cpu"
               for embeds, pooled in bundle._embedded.values())
    cached = bundle.encode(TEXTS[::-1])
    assert t5_rows == [1, 2, 2]  # served from the cache
    assert cached.prompt_embeds.device.type == device
    # other batches than the fresh call's: the same up to float rounding (CLIP's pooled projection by batch size)
    torch.testing.assert_close(cached.prompt_embeds, fresh.prompt_embeds.flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.pooled, fresh.pooled.flip(0), rtol=1e-6, atol=1e-6)
    same_batch = tiny_sd3_bundle().to(device)
    fresh = same_batch.encode(TEXTS)
    same_batch.embed_prompts(TEXTS)  # one text-encoder call of TEXTS, as the fresh one: exactly its embeddings
    cached = same_batch.encode(TEXTS)
    assert torch.equal(cached.prompt_embeds, fresh.prompt_embeds) and torch.equal(cached.pooled, fresh.pooled)


@pytest.mark.parametrize("device", DEVICES)
def test_released_text_encoders_are_gone_and_a_new_prompt_raises(device):
    bundle = tiny_sd3_bundle().to(device)
    null = bundle.encode([""])
    weights = [weakref.ref(next(bundle.pipe.text_encoder_3.parameters())),
               weakref.ref(next(bundle.pipe.text_encoder.parameters()))]
    embed_and_release(bundle, TEXTS[:2])
    gc.collect()
    assert bundle.text_encoders_released and all(ref() is None for ref in weights)  # freed, not moved
    assert bundle.pipe.text_encoder is bundle.pipe.text_encoder_2 is bundle.pipe.text_encoder_3 is None
    assert torch.equal(bundle.null_condition(2).pooled[1], null.pooled[0])  # CFG's empty prompt was embedded too
    bundle.encode(TEXTS[1:2])
    with pytest.raises(RuntimeError, match="'two blue squares' was not embedded before the text encoders were"):
        bundle.encode(TEXTS[1:3])
    with pytest.raises(RuntimeError, match="text encoders were released"):
        bundle.embed_prompts(TEXTS)
    bundle.embed_prompts(TEXTS[:2])  # nothing new: no encoder needed


def test_the_tiny_bundle_keeps_its_text_encoder():
    bundle = TinyBundle(tiny_model_config(load_spec("tests/data/micro.yaml"))).eval()
    before = bundle.encode(["a red circle"])
    embed_and_release(bundle, ["a red circle"])
    assert bundle.text_encoder is not None and torch.equal(bundle.encode(["a red circle"]).pooled, before.pooled)


@pytest.mark.parametrize("device", DEVICES)
def test_decodes_take_host_latents_decode_batch_at_a_time(device):
    bundle = tiny_sd3_bundle().to(device)
    x = torch.randn(5, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))  # on the host
    seen = rows_seen(bundle.vae.decoder)
    images = micro_batched_decode(bundle, x, 2)
    assert seen == [2, 2, 1] and images.shape[0] == 5
    assert np.array_equal(images, bundle.decode(x))


def test_each_process_embeds_and_encodes_only_its_own_prompts():
    prompts = [text_prompt(a + b) for a in "KHGN" for b in "OIAE"]  # 16 prompts, 8 drawn a step
    sampler = SamplerSettings(steps=2, noise_level=0.7, cfg=1.0)
    options = {"prompts_per_step": 4, "group_size": 2, "seed": 3}
    whole = tiny_sd3_bundle()
    everything, shares = rollout_texts(prompts, steps=2, processes=Processes(), **options), set()
    for index in range(2):
        processes = fake_processes(index, 2)
        bundle = tiny_sd3_bundle()
        texts = rollout_texts(prompts, steps=2, processes=processes, **options)
        assert set(texts) < set(everything) and len(texts) == len(set(texts))
        shares |= set(texts)
        embed_and_release(bundle, texts)
        for step in range(2):  # would raise on a prompt of another process's rows
            mine = draw_rollout(bundle, prompts, np.zeros(len(prompts), dtype=int), sampler, step=step,
                                processes=processes, decode=False, **options)
            one = draw_rollout(whole, prompts, np.zeros(len(prompts), dtype=int), sampler, step=step,
                               processes=Processes(), decode=False, **options)
            rows = processes.rows(8)
            assert [p.text for p in mine.prompts] == [p.text for p in one.prompts[rows]]
            assert torch.equal(mine.cond.prompt_embeds, one.cond.prompt_embeds[rows])
            torch.testing.assert_close(mine.cond.pooled, one.cond.pooled[rows], rtol=1e-6, atol=1e-6)
    assert shares == set(everything)

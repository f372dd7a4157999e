"""The tiny bundle: the Bundle protocol, CFG, save / load through safetensors."""

import pytest
import torch

from flowopd.models.bundle import Bundle, Condition
from flowopd.models.tiny import SPECIALS, TinyBundle, build_vocab, split_tokens

VOCAB = build_vocab(['a sign that says "KO"', "a photo of a red circle"])
CONFIG = {"canvas": 16, "patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8, "text_dim": 16,
          "text_layers": 1, "max_text_len": 12, "vocab": VOCAB}


@pytest.fixture
def bundle():
    torch.manual_seed(0)
    return TinyBundle(CONFIG).eval()


def test_bundle_protocol_and_shapes(bundle):
    assert isinstance(bundle, Bundle)
    cond = bundle.encode(['a sign that says "KO"', "a photo of a red circle"])
    assert cond.prompt_embeds.shape == (2, 12, 16) and cond.pooled.shape == (2, 16)
    x = torch.randn(2, *bundle.latent_shape)
    assert bundle.velocity(x, 0.5, cond).shape == x.shape
    images = bundle.decode(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16))
    assert images.dtype.name == "uint8" and images.shape == (1, 16, 16, 3)
    assert images[0, 0, 0].tolist() == [0, 128, 255]


def test_cfg_is_uncond_plus_scale_times_difference(bundle):
    cond = bundle.encode(["a photo of a red circle"] * 2)
    x, sigma = torch.randn(2, *bundle.latent_shape), torch.tensor([0.3, 0.9])
    v_cond = bundle.velocity(x, sigma, cond)
    v_uncond = bundle.velocity(x, sigma, bundle.null_condition(2))
    guided = bundle.velocity(x, sigma, cond, cfg=3.0)
    torch.testing.assert_close(guided, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-4, atol=1e-5)


def test_condition_batch_helpers(bundle):
    cond = bundle.encode(["a", "b"])
    both = Condition.cat([cond, cond.index(slice(0, 1))])
    assert len(both) == 3 and torch.equal(both.prompt_embeds[2], cond.prompt_embeds[0])
    assert torch.equal(cond.repeat_interleave(2).pooled[1], cond.pooled[0])


def test_save_load_round_trip(bundle, tmp_path):
    bundle.save(tmp_path)
    loaded = TinyBundle.load(tmp_path)
    x = torch.randn(1, *bundle.latent_shape)
    cond_a, cond_b = bundle.encode(["a sign"]), loaded.encode(["a sign"])
    assert torch.equal(bundle.velocity(x, 0.4, cond_a, cfg=2.0), loaded.velocity(x, 0.4, cond_b, cfg=2.0))


def test_tokens_are_words_and_single_capital_letters(bundle):
    assert split_tokens('a sign that says "KO"') == ["a", "sign", "that", "says", '"', "K", "O", '"']
    assert VOCAB[: len(SPECIALS)] == list(SPECIALS) and VOCAB == build_vocab(reversed(["a photo of a red circle",
                                                                                       'a sign that says "KO"']))
    ids = bundle.text_encoder.tokenize(['a sign that says "KZ"'])[0].tolist()
    assert ids[7] == VOCAB.index("<unk>") and ids[9:] == [VOCAB.index("<pad>")] * 3  # Z is unknown


def test_overlong_prompt_is_refused_with_the_limit(bundle):
    with pytest.raises(ValueError, match="max_text_len=11"):
        bundle.encode(["a " * 12])


def test_detached_unconditional_branch_keeps_values_and_drops_its_gradient(bundle):
    """uncond_grad false (Flow-GRPO): v_u carries no gradient, so d v / d theta = cfg d v_c / d theta."""
    cond = bundle.encode(["a photo of a red circle"] * 2)
    x, sigma = torch.randn(2, *bundle.latent_shape), torch.tensor([0.3, 0.9])
    weight = bundle.transformer.proj_out.weight

    def grad_of(fn):
        bundle.transformer.zero_grad()
        value = fn()
        value.square().sum().backward()
        return value.detach(), weight.grad.clone()

    trained_value, trained_grad = grad_of(lambda: bundle.velocity(x, sigma, cond, cfg=3.0))
    bundle.detach_uncond = True
    detached_value, detached_grad = grad_of(lambda: bundle.velocity(x, sigma, cond, cfg=3.0))
    torch.testing.assert_close(detached_value, trained_value, rtol=0, atol=0)
    assert not torch.allclose(detached_grad, trained_grad)
    v_uncond = bundle.velocity(x, sigma, bundle.null_condition(2)).detach()
    _, expected = grad_of(lambda: v_uncond + 3.0 * (bundle.velocity(x, sigma, cond) - v_uncond))
    torch.testing.assert_close(detached_grad, expected, rtol=1e-4, atol=1e-6)

"""A no-grad sampler's transformer in another precision (evaluation.dtype): a frozen copy, fp32 in and out."""

import pytest
import torch
from pydantic import ValidationError

from flowopd.evaluation.benchmark import generate
from flowopd.models.bundle import sampling_transformer
from flowopd.models.tiny import TinyBundle, build_vocab
from flowopd.spec import load_spec
from flowopd.spec.model import SamplerSettings

CONFIG = {"canvas": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2, "head_dim": 16, "text_dim": 32,
          "text_layers": 1, "max_text_len": 12, "vocab": build_vocab(["a photo of a red circle", "a blue square"])}


class Prompt:
    def __init__(self, text):
        self.text = text


@pytest.fixture
def bundle():
    torch.manual_seed(0)
    return TinyBundle(CONFIG).eval()


def test_a_bf16_copy_samples_close_to_fp32_and_leaves_the_bundle_as_it_was(bundle):
    before = {k: v.clone() for k, v in bundle.state_dict().items()}
    assert sampling_transformer(bundle, None) is None and sampling_transformer(bundle, "fp32") is None
    copy = sampling_transformer(bundle, "bf16")
    assert copy.dtype == torch.bfloat16 and not any(p.requires_grad for p in copy.parameters())
    cond = bundle.encode(["a photo of a red circle", "a blue square"])
    x = torch.randn(2, *bundle.latent_shape)
    v32, v16 = bundle.velocity(x, 0.5, cond, cfg=2.0), bundle.velocity(x, 0.5, cond, cfg=2.0, transformer=copy)
    assert v16.dtype == torch.float32 and not torch.equal(v16, v32)  # it did run in bf16
    torch.testing.assert_close(v16, v32, rtol=0.05, atol=0.05)  # bf16 keeps about 3 significant digits
    assert all(torch.equal(v, bundle.state_dict()[k]) for k, v in before.items())
    assert bundle.transformer.dtype == torch.float32
    sampler = SamplerSettings(steps=4, noise_level=0.0)
    prompts = [Prompt("a photo of a red circle"), Prompt("a blue square")]
    images = [generate(bundle, prompts, sampler, seed=0, transformer=t) for t in (None, copy)]
    assert images[0].shape == images[1].shape == (2, 16, 16, 3)
    assert abs(images[0].astype(int) - images[1].astype(int)).mean() < 8  # same pictures, up to rounding


def test_only_the_tiny_model_takes_an_evaluation_dtype():
    spec = load_spec("specs/sd3/flow_opd.yaml")
    data = spec.model_dump(mode="json")
    data["evaluation"]["dtype"] = "bf16"
    with pytest.raises(ValidationError, match="an sd3 model samples in model.dtype"):
        type(spec).model_validate(data)

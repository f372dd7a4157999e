"""SD3Bundle on a whole tiny random SD3 pipeline built from configs, offline (no downloads)."""

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from tiny_sd3 import RESOLUTION, TEXT_LEN, tiny_sd3_bundle

from flowopd.flow.sampler import sample
from flowopd.models.bundle import Bundle


@pytest.fixture(scope="module")
def bundle():
    return tiny_sd3_bundle()


def test_encode_velocity_sample_decode(bundle):
    assert isinstance(bundle, Bundle)
    assert bundle.latent_shape == (16, RESOLUTION // 8, RESOLUTION // 8)
    cond = bundle.encode(['a sign that says "KO"', "a photo of a red circle"])
    assert cond.prompt_embeds.shape == (2, 77 + TEXT_LEN, 32) and cond.pooled.shape == (2, 32)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])  # the prompts reach the encoders
    torch.testing.assert_close(bundle.encode(["a photo of a red circle"]).pooled[0], cond.pooled[1])
    null = bundle.null_condition(3)
    assert len(null) == 3 and torch.equal(null.pooled[0], null.pooled[2])

    x = torch.randn(2, *bundle.latent_shape, generator=torch.Generator().manual_seed(0))
    v1 = bundle.velocity(x, 0.7, cond, cfg=1.0)
    v_u = bundle.velocity(x, 0.7, bundle.null_condition(2), cfg=1.0)
    v4 = bundle.velocity(x, torch.tensor([0.7, 0.7]), cond, cfg=4.5)
    assert v1.shape == x.shape and v1.dtype == torch.float32
    torch.testing.assert_close(v4, v_u + 4.5 * (v1 - v_u), rtol=1e-4, atol=1e-5)

    latents, trajectory = sample(
        bundle,
        cond,
        steps=2,
        shift=3.0,
        cfg=4.5,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    assert trajectory.log_probs.shape == (2, 2) and torch.isfinite(trajectory.log_probs).all()
    images = bundle.decode(latents)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
    # decode undoes SD3's latent normalisation: z = x / scaling + shift
    z = latents / 1.5305 + 0.0609
    with torch.no_grad():
        expected = bundle.vae.decode(z).sample
    expected = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, expected)


def test_lora_adapters_share_one_frozen_base(bundle):
    cond = bundle.encode(["a photo of two blue squares"])
    x = torch.randn(1, *bundle.latent_shape, generator=torch.Generator().manual_seed(1))
    bundle.set_adapter(None) if bundle.adapters else None
    with torch.no_grad():
        v_base = bundle.velocity(x, 0.5, cond)
    base_params = {
        n: p.detach().clone() for n, p in bundle.transformer.named_parameters() if "lora_" not in n
    }

    bundle.add_lora("teacher", rank=4, alpha=8)
    bundle.add_lora("student", rank=4, alpha=8)
    assert bundle.adapters == ["teacher", "student"]
    trainable = [n for n, p in bundle.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".teacher." in n for n in trainable) and any(".student." in n for n in trainable)

    # fresh adapters start at the base (B = 0)
    with torch.no_grad():
        torch.testing.assert_close(bundle.velocity(x, 0.5, cond), v_base)
        for n, p in bundle.transformer.named_parameters():
            if ".teacher." in n and "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))

    def velocity_of(name):
        bundle.set_adapter(name)
        with torch.no_grad():
            return bundle.velocity(x, 0.5, cond)

    v_teacher, v_student, v_none = velocity_of("teacher"), velocity_of("student"), velocity_of(None)
    assert not torch.allclose(v_teacher, v_student, atol=1e-4)
    torch.testing.assert_close(v_student, v_base)
    torch.testing.assert_close(v_none, v_base)
    torch.testing.assert_close(velocity_of("teacher"), v_teacher)
    # switching keeps every adapter's trainable flag and never touches the base
    assert [n for n, p in bundle.transformer.named_parameters() if p.requires_grad] == trainable
    for n, p in bundle.transformer.named_parameters():
        if n in base_params:
            assert torch.equal(p, base_params[n])

    # gradients reach the active adapter only
    bundle.set_adapter("student")
    bundle.velocity(x, 0.5, cond).square().mean().backward()
    grads = {n: p.grad for n, p in bundle.transformer.named_parameters() if p.grad is not None}
    assert grads and all(".student." in n for n in grads)
    bundle.transformer.zero_grad(set_to_none=True)

    # an adapter's weights round-trip through its state dict
    state = bundle.adapter_state_dict("teacher")
    bundle.load_adapter_state_dict(
        "student", {k.replace(".teacher", ".student"): v for k, v in state.items()}
    )
    torch.testing.assert_close(velocity_of("student"), v_teacher)
    with pytest.raises(KeyError):
        bundle.set_adapter("nobody")
    with pytest.raises(ValueError, match="unexpected"):
        bundle.load_adapter_state_dict("student", {"not.a.lora_A.weight": torch.zeros(1)})


def merged_transformer(bundle, name):
    """A plain transformer whose weights are base + (alpha / r) B A of adapter `name`: the copy plan's teacher."""
    config = bundle.transformer.peft_config[name]
    scale = config.lora_alpha / config.r
    base = {k.replace(".base_layer", ""): v.detach().clone() for k, v in bundle.transformer.state_dict().items()
            if "lora_" not in k}
    lora = bundle.adapter_state_dict(name)
    for key, a in lora.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            base[f"{module}.weight"] += scale * lora[f"{module}.lora_B.weight"] @ a
    plain = SD3Transformer2DModel.from_config(bundle.transformer.config)
    plain.load_state_dict(base)
    return plain.eval()


def test_adapter_velocities_are_separate_fields_on_one_base():
    bundle = tiny_sd3_bundle()
    cond = bundle.encode(['a sign that says "KO"', "a photo of two red circles"])
    x = torch.randn(2, *bundle.latent_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v_plain = bundle.adapter_velocity(None)(x, 0.6, cond, 4.5)  # no adapters yet: the base
    torch.manual_seed(3)
    for name in ("teacher_a", "teacher_b", "student"):
        bundle.add_lora(name, rank=4, alpha=8, trainable=name == "student")
    with torch.no_grad():
        for n, p in bundle.transformer.named_parameters():
            if "lora_B" in n and ".student." not in n:
                p.copy_(0.3 * torch.randn_like(p))
    bundle.set_adapter("student")
    fields = {name: bundle.adapter_velocity(name) for name in ("teacher_a", "teacher_b", None)}
    with torch.no_grad():
        v = {name: field(x, 0.6, cond, 4.5) for name, field in fields.items()}
        assert bundle.active_adapter == "student"  # every call restores the active adapter
        assert not torch.allclose(v["teacher_a"], v["teacher_b"], atol=1e-3)
        torch.testing.assert_close(v[None], v_plain)
        for name in ("teacher_a", "teacher_b"):  # each field equals a full merged copy of that teacher
            copy_v = bundle.velocity(x, 0.6, cond, 4.5, transformer=merged_transformer(bundle, name))
            torch.testing.assert_close(v[name], copy_v, rtol=1e-4, atol=1e-4)
    # the student trains between teacher calls: its graph survives the switches, teachers get no gradient
    v_student = bundle.adapter_velocity("student")(x, 0.6, cond, 4.5)
    with torch.no_grad():
        target = fields["teacher_a"](x, 0.6, cond, 4.5)
    (v_student - target).square().mean().backward()
    grads = [n for n, p in bundle.transformer.named_parameters() if p.grad is not None]
    assert grads and all(".student." in n for n in grads)
    bundle.set_adapter(None)
    bundle.adapter_velocity("teacher_b")(x, 0.6, cond)
    assert bundle.active_adapter is None
    with pytest.raises(KeyError, match="no adapter 'nobody'"):
        bundle.adapter_velocity("nobody")

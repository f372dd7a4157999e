"""What the memory plan (flowopd/pipeline/memory_plan.py) measures and counts: an SD3 pipeline's parameters on the
meta device, and the activation bytes of one row, measured.

Activation bytes per row are measured, on the model's own config, in a fresh process (`probe`): a transformer of
the model's real width cut to one block of each kind it has (joint blocks with SD3.5's second attention, plain joint
blocks, the last block, which keeps no text stream), in `model.dtype` with the trained LoRA in fp32, runs one row at
the spec's resolution and text length (77 CLIP + `max_sequence_length` T5 tokens):
- training: the resident set read before and after each block's forward gives the bytes each block keeps for the
  backward pass (with gradient checkpointing: its input only); the high-water mark over the backward gives the
  working set on top (with checkpointing it holds one recomputed block). L layers keep
  fixed + sum over blocks of kept(kind), plus that working set;
- inference: the high-water mark of a forward without gradients (nothing is kept between blocks: depth-free);
- VAE decode: the high-water mark of one image decoded at min(resolution, 256) px, scaled by the pixel count
  (SD3.5-M's VAE in fp32: 1.03 GB at 512 px so scaled, 1.03 GB measured at 512 px).
Rows scale linearly (tests/pipeline/test_memory_plan.py checks a 2-row step of a deeper model against its measured
peak). The process's memory is read from /proc (VmRSS, VmHWM; Linux) with glibc's mmap threshold fixed at 64 kB, so
a freed tensor leaves the resident set at once and the set tracks the live tensors, as CUDA's allocated bytes do.
PyTorch's CPU attention is a flash kernel, as on the GPU: no tokens^2 matrices are kept on either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowopd.models.bundle import TORCH_DTYPES

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
CLIP_TOKENS = 77  # SD3's prompt embedding: 77 CLIP tokens + max_sequence_length T5 tokens
VAE_PROBE_PIXELS = 256  # the VAE decode is measured at most this large, then scaled by the pixel count
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # resident set = live tensors

SD35M_ID = "stabilityai/stable-diffusion-3.5-medium"
SD35M = {  # its transformer/config.json
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
SD35M_VAE = {  # its vae/config.json (the parts that shape the model)
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
SD35M_TEXT = {  # CLIP-L, CLIP-G (CLIPTextModelWithProjection) and T5-XXL (T5EncoderModel)
    "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"},
    "text_encoder_3": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                       "num_heads": 64, "feed_forward_proj": "gated-gelu"},
}
PICKSCORE_CLIP = {  # yuvalkirstain/PickScore_v1: CLIP ViT-H/14
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "projection_dim": 1024,
}


# ---------------------------------------------------------------- process memory (Linux /proc)
def vm(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current VmRSS


# ---------------------------------------------------------------- sizes, counted on the meta device
def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _folder_config(folder: Path, sub: str) -> dict | None:
    path = folder / sub / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@dataclass
class ModelSizes:
    """An SD3 pipeline's parameter counts and the shapes its memory depends on."""

    source: str  # where the configs came from
    transformer_config: dict
    vae_config: dict
    transformer: int  # parameters
    position_table: int  # the transformer's buffers
    vae: int
    text_encoders: int
    linears: list[tuple[str, int, int]] = field(repr=False)  # (name, in, out) of the transformer's Linear layers

    def lora(self, settings) -> int:
        """Parameters of a LoRA adapter (peft's matching: a module named t or ending in .t)."""
        targets = settings.target_modules
        return sum(settings.rank * (i + o) for name, i, o in self.linears
                   if any(name == t or name.endswith("." + t) for t in targets))


def model_sizes(pretrained: str) -> ModelSizes:
    """Sizes from a local folder's configs (diffusers' layout), else the built-in SD3.5 Medium ones for its hub id."""
    folder = Path(pretrained)
    if (folder / "transformer" / "config.json").is_file():
        text = {sub: _folder_config(folder, sub) for sub in SD35M_TEXT}
        return sizes_from_configs(f"the configs in {pretrained}", _folder_config(folder, "transformer"),
                                  _folder_config(folder, "vae"), text)
    if pretrained == SD35M_ID:
        return sizes_from_configs("SD3.5 Medium's configs (built in)", SD35M, SD35M_VAE, SD35M_TEXT)
    raise SystemExit(f"model.pretrained {pretrained!r}: no local folder with transformer/config.json and no built-in "
                     f"configs (only {SD35M_ID}); download the model's configs to a folder and point "
                     "model.pretrained at it")


def sizes_from_configs(source: str, transformer_config: dict, vae_config: dict, text: dict) -> ModelSizes:
    """Build each component on the meta device and count; text: {text_encoder, text_encoder_2, text_encoder_3:
    config or None}."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(transformer_config)
        vae = AutoencoderKL.from_config(vae_config)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**text[sub])) for sub in ("text_encoder",
                                                                                         "text_encoder_2")
                    if text.get(sub) is not None]
        if text.get("text_encoder_3") is not None:
            encoders.append(T5EncoderModel(T5Config(**text["text_encoder_3"])))
    linears = [(name, m.in_features, m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear)]
    return ModelSizes(source, dict(transformer.config), dict(vae.config), count(transformer),
                      sum(b.numel() for b in transformer.buffers()), count(vae), sum(map(count, encoders)), linears)


def pickscore_parameters(model: str) -> int:
    """PickScore's CLIP: its folder's config when there is one, else PickScore_v1's (CLIP ViT-H/14)."""
    from transformers import CLIPConfig, CLIPModel

    config = _folder_config(Path(model).parent, Path(model).name) or PICKSCORE_CLIP
    with torch.device("meta"):
        return count(CLIPModel(CLIPConfig(**{k: v for k, v in config.items() if not k.startswith("_")})))


# ---------------------------------------------------------------- activations per row, measured (in a fresh process)
def block_kinds(config: dict) -> list[str]:
    """Each transformer block's kind: joint or last (context_pre_only: no text stream out), +dual with SD3.5's
    second attention."""
    layers, dual = config["num_layers"], set(config.get("dual_attention_layers") or ())
    return [("last" if i == layers - 1 else "joint") + ("+dual" if i in dual else "") for i in range(layers)]


def _probe_config(config: dict, resolution: int) -> tuple[dict, list[str]]:
    """One block of each kind of `config`, the last one last; the position table cut to the latent's size."""
    kinds = block_kinds(config)
    probe = sorted(set(kinds[:-1])) + [kinds[-1]]
    dual = tuple(i for i, kind in enumerate(probe) if "dual" in kind)
    cut = dict(config, num_layers=len(probe), dual_attention_layers=dual)
    if cut.get("pos_embed_max_size"):
        cut["pos_embed_max_size"] = resolution // 8 // config["patch_size"]
    return cut, probe


def _training_row(transformer, inputs: dict, trainable: list) -> dict:
    """Bytes one row keeps per block for the backward pass, outside the blocks, and the backward's working set."""
    marks, recording = {}, [True]

    def mark(i, end):
        def hook(*_):
            if recording[0]:  # not in the backward's recomputation (gradient checkpointing)
                marks[i, end] = vm("VmRSS")
        return hook

    handles = [h for i, block in enumerate(transformer.transformer_blocks)
               for h in (block.register_forward_pre_hook(mark(i, 0)), block.register_forward_hook(mark(i, 1)))]
    for p in trainable:  # the gradients are planned apart
        p.grad = torch.zeros_like(p)
    rss = vm("VmRSS")
    reset_peak()
    out = transformer(**inputs, return_dict=False)[0]
    kept = vm("VmRSS") - rss
    recording[0] = False
    out.float().square().mean().backward()
    peak = vm("VmHWM") - rss
    del out
    for handle in handles:
        handle.remove()
    blocks = [marks[i, 1] - marks[i, 0] for i in range(len(transformer.transformer_blocks))]
    return {"blocks": blocks, "fixed": kept - sum(blocks), "working": max(peak - kept, 0)}


def probe(request: dict) -> dict:
    """Measure one row's activation bytes on a cut-down transformer of the model's width (see the module doc)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig

    dtype, resolution = TORCH_DTYPES[request["dtype"]], request["resolution"]
    config, kinds = _probe_config(request["transformer_config"], resolution)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_config(config).to(dtype).requires_grad_(False)
    lora = request["lora"]
    if lora is not None:  # as flowopd.models.sd3.SD3Bundle.add_lora
        transformer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                           target_modules=list(lora["target_modules"]), init_lora_weights="gaussian"),
                                adapter_name="policy")
    trainable = [p for n, p in transformer.named_parameters() if lora is None or "lora_" in n]
    for p in trainable:  # fp32 master weights, as flowopd.train.policy.prepare_policy
        p.data = p.data.float()
        p.requires_grad_(True)
    side = resolution // 8
    inputs = {"hidden_states": torch.randn(1, config["in_channels"], side, side, dtype=dtype),
              "timestep": torch.full((1,), 500.0),
              "encoder_hidden_states": torch.randn(1, request["text_tokens"], config["joint_attention_dim"],
                                                   dtype=dtype),
              "pooled_projections": torch.randn(1, config["pooled_projection_dim"], dtype=dtype)}
    result = {"kinds": kinds}
    with torch.no_grad():
        rss = vm("VmRSS")
        reset_peak()
        transformer(**inputs, return_dict=False)
        result["inference"] = vm("VmHWM") - rss
    transformer.train()
    for checkpointing in request["checkpointing"]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        result["checkpointed" if checkpointing else "plain"] = _training_row(transformer, inputs, trainable)
    if request.get("vae_config") is not None:
        pixels = min(resolution, VAE_PROBE_PIXELS)
        vae = AutoencoderKL.from_config(request["vae_config"]).to(TORCH_DTYPES[request["vae_dtype"]]).eval()
        z = torch.randn(1, vae.config.latent_channels, pixels // 8, pixels // 8, dtype=vae.dtype)
        with torch.no_grad():
            rss = vm("VmRSS")
            reset_peak()
            vae.decode(z, return_dict=False)
            result["decode"] = (vm("VmHWM") - rss) * (resolution / pixels) ** 2
    return result


def run_probe(request: dict) -> dict:
    """`probe` in a fresh process (memory freed by one measurement cannot hide another's)."""
    done = subprocess.run([sys.executable, "-m", "flowopd.pipeline.memory_probe", json.dumps(request)],
                          capture_output=True, text=True, env=os.environ | PROBE_ENV, check=False)
    if done.returncode:
        raise RuntimeError(f"the activation probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class RowBytes:
    """Activation bytes of one row (one sample's forward; CFG: two rows) at the full depth, and of one decoded image."""

    train: float
    train_checkpointed: float | None
    inference: float
    decode: float | None


def extrapolate(measured: dict, config: dict) -> RowBytes:
    """The probe's blocks scaled to the model's depth: fixed + sum over blocks of kept(kind) + the working set."""
    counts = Counter(block_kinds(config))

    def train(row):
        if row is None:
            return None
        kept = dict(zip(measured["kinds"], row["blocks"], strict=True))
        return row["fixed"] + sum(n * kept[kind] for kind, n in counts.items()) + row["working"]

    return RowBytes(train(measured.get("plain")), train(measured.get("checkpointed")), measured["inference"],
                    measured.get("decode"))


def measure_rows(sizes: ModelSizes, model, lora, checkpointing, decode: bool = True) -> RowBytes:
    """Measured activation bytes per row for the spec's model section, a trained adapter (None: all weights) and
    the checkpointing settings needed (a set of bools); decode: measure the VAE's decode too."""
    request = {"transformer_config": sizes.transformer_config, "dtype": model.dtype, "resolution": model.resolution,
               "text_tokens": CLIP_TOKENS + model.max_sequence_length, "checkpointing": sorted(checkpointing),
               "lora": None if lora is None else lora.model_dump(mode="json"),
               "vae_config": sizes.vae_config if decode else None, "vae_dtype": model.vae_dtype or model.dtype}
    return extrapolate(run_probe(request), sizes.transformer_config)


def training_step_peak(sizes: ModelSizes, rows: RowBytes, lora, dtype: str, n_rows: int, checkpointing: bool) -> float:
    """Predicted peak of one training step of the transformer alone (a forward of n_rows, backward, AdamW; no EMA):
    what tests/pipeline/test_memory_plan.py measures."""
    n = sizes.lora(lora) if lora is not None else sizes.transformer
    weights = (sizes.transformer + sizes.position_table) * DTYPE_BYTES[dtype]
    if lora is None:
        weights -= sizes.transformer * DTYPE_BYTES[dtype]  # the trained weights are the fp32 ones
    return weights + 16 * n + n_rows * (rows.train_checkpointed if checkpointing else rows.train)


if __name__ == "__main__":  # the probe's own process (run_probe)
    print(json.dumps(probe(json.loads(sys.argv[1]))))

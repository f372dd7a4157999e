"""Model artifacts as bundles: the starting model of a spec, a trained artifact, frozen teachers, weight hashes.

A model artifact folder holds a tiny model's whole weights (`model.safetensors` + `model_config.json`, written by
TinyBundle.save) or an sd3 LoRA adapter (`adapter.safetensors` + `adapter.json`) on the spec's pretrained base; an
sd3 folder without an adapter (a `none` cold start) stands for the bare base. Every artifact folder is checked
against the sha256 its producer recorded (flowopd.runtime.artifacts.verify_artifact) before it is read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowopd.models.bundle import TORCH_DTYPES
from flowopd.runtime.artifacts import verify_artifact

WEIGHT_FILES = ("model.safetensors", "adapter.safetensors")  # tiny, sd3


def load_bundle(spec, base_dir: Path | None, device: torch.device | None = None):
    """The starting model: the tiny base artifact, or SD3 from its pretrained folder / hub id (on `device`, by
    default the GPU when present)."""
    if spec.model.kind == "tiny":
        from flowopd.models.tiny import TinyBundle

        if base_dir is None:
            raise SystemExit("a tiny spec starts from the base artifact: pass --base")
        verify_artifact(base_dir)
        return TinyBundle.load(base_dir)
    from flowopd.models.sd3 import SD3Bundle

    bundle = SD3Bundle.from_pretrained(spec.model.pretrained, revision=spec.model.revision,
                                       dtype=TORCH_DTYPES[spec.model.dtype], resolution=spec.model.resolution,
                                       max_sequence_length=spec.model.max_sequence_length)
    if spec.model.vae_dtype is not None:
        bundle.vae.to(TORCH_DTYPES[spec.model.vae_dtype])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return bundle.to(device) if device.type != "cpu" else bundle


def load_model(spec, folder: Path, device: torch.device | None = None):
    """A model artifact as a bundle: tiny: the whole TinyBundle; sd3: the pretrained base with the folder's adapter
    active (a folder without one, e.g. a `none` cold start: the bare base)."""
    verify_artifact(folder)
    if spec.model.kind == "tiny":
        from flowopd.models.tiny import TinyBundle

        return TinyBundle.load(folder)
    from flowopd.models.sd3 import ADAPTER_WEIGHTS

    bundle = load_bundle(spec, None, device)
    if (Path(folder) / ADAPTER_WEIGHTS).exists():
        bundle.load_adapter("model", folder)
        bundle.set_adapter("model")
    return bundle


def require_teacher_dirs(names, teacher_dirs: dict) -> None:
    """Stop with the command-line fix when a needed teacher's folder was not passed ("base" needs none)."""
    missing = [name for name in names if name != "base" and name not in teacher_dirs]
    if missing:
        raise SystemExit(f"teachers {', '.join(map(repr, missing))} are needed: pass "
                         + " ".join(f"--teacher {name}=DIR" for name in missing))


def load_teachers(names, teacher_dirs: dict, base_dir: Path | None = None, config: dict | None = None) -> dict:
    """TinyBundles of the named teachers, frozen, in eval mode; "base" is the base model. Checks model configs."""
    from flowopd.models.tiny import TinyBundle

    if "base" in names and base_dir is None:
        raise SystemExit("the base model is needed (a route or the MAR anchor): pass --base")
    require_teacher_dirs(names, teacher_dirs)
    bundles = {}
    for name in names:
        folder = base_dir if name == "base" else teacher_dirs[name]
        verify_artifact(folder)
        bundle = TinyBundle.load(folder)
        if config is not None and bundle.config != config:
            raise SystemExit(f"{name} ({folder}) has another model config than the base")
        for module in bundle.modules().values():
            module.requires_grad_(False)
        bundles[name] = bundle
    return bundles


def weights_sha(folder: Path | None) -> str | None:
    """sha256 of a model artifact's weights, model.safetensors (tiny) or adapter.safetensors (sd3), after checking
    the folder against its producer's record; None without a folder or weights."""
    if folder is None:
        return None
    hashes = verify_artifact(folder)
    return next((hashes[name] for name in WEIGHT_FILES if name in hashes), None)

"""Training state: the EMA of the weights, RNG states, and checkpoints written atomically beside the output.

A run killed at any moment (kill -9 included) resumes from its last checkpoint to bit-identical weights on CPU.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CHECKPOINT_FILE = "state.pt"


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta, applied every `every` steps (Flow-GRPO's EMAModuleWrapper).

    d = min(decay, (1 + k) / (10 + k)) at step k: a short warm-up so the first updates are not dominated by the
    starting weights. Step k updates when (k + 1) % every == 0.
    """

    def __init__(self, params: list[Tensor], decay: float, every: int):
        self.decay, self.every = decay, every
        self.shadow = [p.detach().clone() for p in params]

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, params: list[Tensor], step: int) -> None:
        if (step + 1) % self.every == 0:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - self.current_decay(step))

    @torch.no_grad()
    def copy_to(self, params: list[Tensor]) -> None:
        for shadow, p in zip(self.shadow, params, strict=True):
            p.copy_(shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.every = state["decay"], state["every"]
        self.shadow = [s.clone() for s in state["shadow"]]


# ---------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """Every global RNG's state as tensors and plain Python values, so a checkpoint loads with weights_only=True."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])


class Checkpoints:
    """The latest training state in one file of a folder outside the (atomic) output folder.

    Saved as a temp file then renamed, so a run killed at any moment (kill -9) leaves the previous checkpoint
    whole. A checkpoint whose fingerprint (what the run depends on) differs is ignored, not resumed.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.path = self.folder / CHECKPOINT_FILE

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:  # weights_only: a planted or corrupted file is refused, never unpickled into running code
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            print(f"note: {self.path} is not a checkpoint this version can read ({type(error).__name__}); "
                  f"starting from scratch")
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"note: {self.path} is from other settings or inputs; starting from scratch")
            return None
        return state

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # a fresh temp name in the folder (O_EXCL): never a planted file or symlink
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".state-", suffix=".tmp", delete=False) as handle:
            torch.save({**state, "fingerprint": self.fingerprint}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, self.path)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_folder(out: Path) -> Path:
    """`<out>.ckpt` beside the output folder (atomic_folder replaces `out` whole, so it cannot live inside)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")

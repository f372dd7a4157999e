"""One skeleton for every trainer: the trainer class does a step's work, the driver does everything around it.

A trainer (flowopd.methods.grpo's GRPO, flowopd.methods.opd_trainer's on-policy distillation, supervised-style reward trainers) subclasses
`Trainer` and implements `step(k) -> row`: roll out (flowopd.train.rollouts), score or query its teachers, update the
weights through `optimizer_step()`, and return the step's curve row (floats, or None for an empty cell). Whatever
is random at step k comes from (seed, stream, k) (flowopd.train.policy's streams), so a step depends only on the
trainer's state and k, and a resumed run draws step k alike.

`Trainer` holds what they all share: the trained weights (the whole transformer or a LoRA adapter), AdamW, the EMA
of the weights, this process's place among several (flowopd.runtime.processes), and the state a checkpoint holds.
Its settings need `lr`, `grad_clip`, `ema`, `steps`, `checkpoint_every` and `gradient_checkpointing`.

The driver:
- `train`: the step loop with its progress bar; the EMA moves after every step; checkpoints every
  `checkpoint_every` steps (the main process writes them) and resumes from the last one, after kill -9 too, to
  bit-identical weights on CPU;
- `run_training`: a training phase around it: train, put the EMA weights in, and from the main process write the
  artifact atomically (weights, curve.csv, spec.json + meta.json provenance, flowopd.runtime.artifacts; the phase's
  budget, what its Meter counted, goes to the run record), then drop the checkpoint. Several processes follow the
  same steps and wait for the main one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from flowopd.runtime.artifacts import (
    atomic_folder,
    now,
    sha256_file,
    spec_identity,
    write_curve,
    write_provenance,
)
from flowopd.runtime.processes import Processes
from flowopd.runtime.records import BUDGET, Meter, budget, tally
from flowopd.spec.hashing import canonical_hash
from flowopd.train.policy import (
    ADAPTER,
    enable_gradient_checkpointing,
    make_optimizer,
    prepare_policy,
    save_policy,
)
from flowopd.train.state import EMA, Checkpoints, checkpoint_folder, rng_state, set_rng_state


class Trainer:
    """The trained policy and its optimiser; subclasses implement `step(k)`.

    lora: LoraSettings to train a new adapter (init_adapter: its starting weights), None: all transformer weights.
    processes: this process's share of each step's batch; the default is a single process.
    """

    progress_keys: tuple[str, ...] = ("loss",)  # curve columns the progress bar shows

    def __init__(self, bundle, settings, *, seed: int = 0, lora=None, init_adapter: dict | None = None,
                 processes: Processes | None = None):
        self.processes = processes or Processes()
        self.bundle, self.settings, self.seed, self.lora = bundle, settings, seed, lora
        torch.manual_seed(seed)  # LoRA's gaussian A
        self.named_params = prepare_policy(bundle, lora)
        if init_adapter is not None:
            bundle.load_adapter_state_dict(ADAPTER, init_adapter)
        self.params = list(self.named_params.values())
        self.optimizer = make_optimizer(self.params, settings.lr)
        self.ema = EMA(self.params, settings.ema.decay, settings.ema.every) if settings.ema else None
        if settings.gradient_checkpointing:
            enable_gradient_checkpointing(bundle.transformer)
        sampler = getattr(settings, "sampler", None)
        bundle.detach_uncond = sampler is not None and not sampler.uncond_grad  # read by every velocity with grad

    def step(self, step: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement step(k) -> curve row")

    def optimizer_step(self) -> float:
        """Sum the gradients over processes, clip their norm at settings.grad_clip, one AdamW step. -> the norm."""
        self.processes.sum_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip or float("inf"))
        self.optimizer.step()
        tally("optimizer_steps", int(self.processes.is_main))  # one step of the model, however many processes took it
        return grad_norm.item()

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "params": {name: p.detach().clone() for name, p in self.named_params.items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.named_params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])

    def apply_ema(self) -> None:
        """Put the EMA weights into the model (what gets saved and evaluated); no-op without EMA."""
        if self.ema is not None:
            self.ema.copy_to(self.params)


def train(trainer: Trainer, steps: int, checkpoints: Checkpoints | None = None, checkpoint_every: int = 50,
          progress: bool = True, on_step=None, desc: str = "train", meter: Meter | None = None) -> list[dict]:
    """Run steps [resumed step, steps); checkpoint every `checkpoint_every`. Returns the curve (one row per step).

    `on_step(step)` runs after each step and its checkpoint (tests interrupt a run there). Over several processes
    every one resumes from the same checkpoint; the main one alone shows the bar and writes checkpoints. `meter`:
    the phase's, whose spending so far each checkpoint keeps, so a resumed run's budget counts the killed run's too.
    """
    curve, first, elapsed = [], 0, 0.0
    is_main = trainer.processes.is_main
    state = checkpoints.load() if checkpoints is not None else None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        curve, first, elapsed = state["curve"], state["step"], state["seconds"]
        if meter is not None:
            meter.carry(state.get("budget"), add=is_main)  # every process's spending, counted once
        if is_main:
            print(f"resuming {desc} from step {first} ({checkpoints.path})")
    start = time.perf_counter() - elapsed
    bar = tqdm(range(first, steps), initial=first, total=steps, desc=desc, unit="step",
               disable=not progress or not is_main, dynamic_ncols=True)
    for step in bar:
        row = trainer.step(step)
        if trainer.ema is not None:
            trainer.ema.step(trainer.params, step)
        row["seconds"] = round(time.perf_counter() - start, 3)
        curve.append(row)
        bar.set_postfix({k: "-" if row.get(k) is None else f"{row[k]:.3g}" for k in trainer.progress_keys})
        done = step + 1
        if checkpoints is not None and done % checkpoint_every == 0 and done < steps:
            spending = spent(meter, trainer.processes) if meter is not None else None  # every process takes part
            if is_main:
                checkpoints.save({"trainer": trainer.state_dict(), "curve": curve, "step": done,
                                  "seconds": row["seconds"], "budget": spending})
        if on_step is not None:
            on_step(step)
    return curve


def run_training(trainer: Trainer, *, spec, phase: str, out: Path, sub_spec: dict, inputs: dict, provenance: dict,
                 started: str, start: float, curve_path: Path | None = None, progress: bool = True,
                 meter: Meter | None = None, parents=()) -> None:
    """Train `trainer` for settings.steps, resuming from `<out>.ckpt`, and write the EMA model to `out` atomically.

    inputs: what the run depends on besides its sub-spec (input artifacts' hashes, the prompts' digest): with the
    sub-spec it fingerprints the checkpoint, so one from other settings or inputs is not resumed. provenance: the
    phase's own meta.json fields; the driver adds the spec's identity, the process count, sizes, times and the
    weights' sha256. started / start: when the phase began (ISO time, time.time()), model loading included.
    meter: the phase's (made when it began), whose count becomes the run record's budget with the lineage of
    `parents`, the model folders the phase started from or learned from (flowopd.runtime.records.budget).
    """
    settings, processes, out = trainer.settings, trainer.processes, Path(out)
    checkpoints = Checkpoints(checkpoint_folder(out), canonical_hash({"sub_spec": sub_spec, **inputs}))
    curve = train(trainer, settings.steps, checkpoints, settings.checkpoint_every, progress, desc=f"{phase} {out.name}",
                  meter=meter)
    trainer.apply_ema()
    spending = spent(meter, processes) if meter is not None else None  # every process takes part
    if not processes.is_main:  # the same weights everywhere; the main process writes them
        processes.wait()
        return
    with atomic_folder(out) as folder:
        weights_file = save_policy(trainer.bundle, folder, trainer.lora)
        write_curve(folder / "curve.csv", curve)
        write_provenance(
            folder, phase, sub_spec, **spec_identity(spec), **provenance, curve=curve, processes=processes.count,
            lora=trainer.lora is not None, trainable_parameters=sum(p.numel() for p in trainer.params),
            steps=settings.steps, train_seconds=curve[-1]["seconds"], started=started, finished=now(),
            seconds=round(time.time() - start, 2), weights_sha256=sha256_file(weights_file),
            budget=budget(spending, parents),
        )
    if curve_path is not None:
        write_curve(curve_path, curve)
    checkpoints.clear()
    processes.wait()


def spent(meter: Meter, processes: Processes) -> dict | None:
    """What every process has spent since the phase's meter was made (a collective: every process calls it); None
    when unknown. Optimizer steps are the model's, counted by the main process alone."""
    mine = meter.spent()
    if mine is None:
        return None
    total = processes.sum([float(mine[key]) for key in BUDGET])  # float64: counts stay exact below 2^53
    return {key: value if key == "cpu_s" else round(value) for key, value in zip(BUDGET, total)}


def lora_settings(spec, settings):
    """A phase's own adapter, else the model's (sd3), else None: train all weights (tiny default)."""
    if settings.lora is not None:
        return settings.lora
    return spec.model.lora if spec.model.kind == "sd3" else None

"""The memory plan of an sd3 spec: what each stage holds on one GPU, predicted before the run (`flowopd spec plan`).

Per stage and GPU (GB = 1e9 bytes), from the spec and the model's configs:
- frozen weights: the base transformer (with its position table) in `model.dtype`, the VAE in `model.vae_dtype`, the
  frozen LoRA adapters beside it (teachers, the MAR anchor, an evaluated model) in `model.dtype`, in-process reward
  models (PickScore's CLIP in its dtype; OCR runs on the CPU, remote rewards elsewhere), NFT's old-policy copy.
  Parameter counts come from the real configs built on PyTorch's meta device (no memory, no download): the folder's
  own configs when `model.pretrained` is a local folder, the built-in SD3.5 Medium configs for its hub id;
- text encoders (CLIP-L, CLIP-G, T5) in `model.dtype`: a stage embeds its prompts once, then frees them, so they
  are on the GPU only before the first step and never beside the activations;
- the trained adapter (all transformer weights when there is no LoRA): fp32 weights (flowopd.train.policy makes
  them fp32 master weights; the frozen rest stays in `model.dtype`) plus the EMA's fp32 copy; AdamW's two fp32
  moments (optimizer); fp32 gradients;
- activations: bytes per row x rows, the largest of a training forward with gradients (a micro-batch, x2 rows when
  the trainer trains the guided velocity), an inference forward (rollouts, teacher and anchor targets, sampling:
  x2 rows with CFG) and a VAE decode (`decode_batch` images); trainers add their rollout's latents (fp32).

Activation bytes per row are measured on the model's own config: flowopd/pipeline/memory_probe.py. Both modules
live here, where no stage imports them, so editing them reruns no stage (flowopd/pipeline/code_deps.py).

Not counted, so held back as HEADROOM (10% of the GPU): the CUDA context (~0.5 GB), cuBLAS / cuDNN workspaces, the
caching allocator's fragmentation, AdamW's step temporaries, reward-model and text-encoder activations, and host
copies (prompt embeddings, decoded images, SFT targets live on the host).
"""

from __future__ import annotations

from dataclasses import dataclass

from flowopd.pipeline.memory_probe import (
    CLIP_TOKENS,
    DTYPE_BYTES,
    GB,
    ModelSizes,
    RowBytes,
    measure_rows,
    model_sizes,
    pickscore_parameters,
)

HEADROOM = 0.10  # of the GPU's memory: CUDA context, workspaces, fragmentation


def layout(lora) -> tuple | None:
    """What an adapter's activations depend on besides its rank: the modules it targets (None: no adapter)."""
    return None if lora is None else tuple(lora.target_modules)


# ---------------------------------------------------------------- one stage's memory
@dataclass
class StageMemory:
    """Bytes one GPU holds in a stage (see the module doc); `micro` describes its micro-batch."""

    stage: str
    micro: str = "-"
    rows: int = 0  # transformer rows per forward with gradients
    frozen: float = 0.0
    text_encoders: float = 0.0
    adapter: float = 0.0
    optimizer: float = 0.0
    gradients: float = 0.0
    activations: float = 0.0
    checkpointing: bool | None = None  # the stage's gradient_checkpointing (None: it trains nothing)
    note: str = ""

    @property
    def peak(self) -> float:
        """The text encoders are freed before the first step: never on the GPU with the activations."""
        return self.frozen + self.adapter + self.optimizer + self.gradients + max(self.text_encoders, self.activations)


class Planner:
    """The stages of an sd3 spec with their memory on one of `gpus` GPUs. eval_batch: prompts per evaluation sampling
    call; sample_batch: rows per SFT sampling call (flowopd.evaluation.benchmark, flowopd.methods.sft)."""

    def __init__(self, spec, gpus: int, eval_batch: int, sample_batch: int, sizes: ModelSizes | None = None):
        if spec.model.kind != "sd3":
            raise SystemExit("the memory plan is for sd3 specs (model.kind: sd3); the tiny world runs on a CPU in "
                             "megabytes")
        self.spec, self.gpus, self.eval_batch, self.sample_batch = spec, gpus, eval_batch, sample_batch
        self.sizes = sizes or model_sizes(spec.model.pretrained)
        self.bytes = DTYPE_BYTES[spec.model.dtype]
        self.latent = self.sizes.transformer_config["in_channels"] * (spec.model.resolution // 8) ** 2
        self.rows: dict[tuple, RowBytes] = {}

    # -- sizes ---------------------------------------------------------------------------------------------
    def base_bytes(self) -> float:
        """The frozen transformer and the VAE."""
        vae = DTYPE_BYTES[self.spec.model.vae_dtype or self.spec.model.dtype]
        return (self.sizes.transformer + self.sizes.position_table) * self.bytes + self.sizes.vae * vae

    def reward_bytes(self, tasks) -> float:
        total = 0.0
        for name in sorted(set(tasks)):
            task = self.spec.tasks[name]
            if task.reward == "pickscore":
                total += pickscore_parameters(task.pickscore.model) * DTYPE_BYTES[task.pickscore.dtype]
        return total

    def lora_of(self, settings):
        return settings.lora if settings.lora is not None else self.spec.model.lora

    def teacher_lora(self, name):
        return self.lora_of(self.spec.teachers[name].method)

    def adapter_bytes(self, lora) -> float:
        return self.sizes.lora(lora) * self.bytes

    def student_lora(self):
        """The adapter OPD trains: the cold start's (a product merge has the teachers' ranks summed)."""
        cold = self.spec.cold_start
        if cold.method == "merge":
            used = [self.teacher_lora(name) for name, weight in cold.weights.items() if weight > 0]
            rank = sum(lora.rank for lora in used) if cold.lora_merge == "product" else used[0].rank
            return used[0].model_copy(update={"rank": rank})
        return self.lora_of(cold) if cold.method == "sft" else self.lora_of(self.spec.opd)

    def trained(self, lora, ema: bool) -> dict:
        """The trained weights' bytes: fp32 weights (+ EMA copy), AdamW's two moments, gradients."""
        n = self.sizes.lora(lora) if lora is not None else self.sizes.transformer
        return {"adapter": 4 * n * (2 if ema else 1), "optimizer": 8 * n, "gradients": 4 * n}

    def trained_stages(self) -> list[tuple]:
        """(adapter or None, settings) of every stage that trains."""
        spec = self.spec
        pairs = [(self.teacher_lora(name), spec.teachers[name].method) for name in spec.teachers]
        pairs += [(self.lora_of(spec.baseline.method), spec.baseline.method), (self.student_lora(), spec.opd)]
        if spec.cold_start.method == "sft":
            pairs.append((self.lora_of(spec.cold_start), spec.cold_start))
        return pairs

    def row_bytes(self, lora) -> RowBytes:
        """Measured once per adapter layout (its target modules), at the largest rank trained with it and with
        every checkpointing setting used with it."""
        key = layout(lora)
        if key not in self.rows:
            same = [(trained, settings) for trained, settings in self.trained_stages() if layout(trained) == key]
            largest = max((trained for trained, _ in same), key=lambda trained: trained.rank, default=None)
            checkpointing = {settings.gradient_checkpointing for _, settings in same} or {False}
            self.rows[key] = measure_rows(self.sizes, self.spec.model, largest if key else None, checkpointing)
        return self.rows[key]

    def share(self, batch: int, what: str) -> int:
        if batch % self.gpus:
            raise SystemExit(f"{what} {batch} does not split over {self.gpus} GPUs: make it a multiple of --gpus")
        return batch // self.gpus

    # -- stages --------------------------------------------------------------------------------------------
    def _training(self, stage: str, settings, lora, extra_frozen: float, train_rows: int, rollout_rows: int,
                  micro: str, decode: int, buffers: float, ema: bool) -> StageMemory:
        rows = self.row_bytes(lora)
        train = rows.train_checkpointed if settings.gradient_checkpointing else rows.train
        frozen = self.base_bytes() + extra_frozen
        if lora is None and getattr(settings, "beta", 0) > 0:
            frozen += self.sizes.transformer * self.bytes  # the frozen reference copy
        activations = buffers + max(train_rows * train, rollout_rows * rows.inference, decode * (rows.decode or 0))
        return StageMemory(stage, micro, train_rows, frozen, self.sizes.text_encoders * self.bytes,
                           activations=activations, checkpointing=settings.gradient_checkpointing,
                           **self.trained(lora, ema))

    def teacher(self, stage: str, method, tasks) -> StageMemory:
        """GRPO or NFT: rollout (inference in micro-batches), decode, scoring, update (training in micro-batches)."""
        share = self.share(method.prompts_per_step * method.group_size, f"{stage}: prompts_per_step x group_size")
        micro = min(method.micro_batch or share, share)
        lora = self.lora_of(method)
        trajectory = (method.sampler.steps + 1) * share * self.latent * 4
        if method.kind == "grpo":
            guided = method.cfg_train and method.sampler.cfg != 1
            train_rows, rollout_rows, extra = micro * (2 if guided else 1), micro * (1 + (method.sampler.cfg != 1)), 0.0
            buffers = trajectory * (2 if method.beta > 0 else 1)  # + the reference's step means
        else:  # nft: the guided velocity's branches are separate forwards; the old policy is a full copy
            train_rows = micro
            rollout_rows = micro * (2 if method.cfg_train and method.sampler.cfg != 1 else 1)
            n = self.sizes.transformer
            extra = n * self.bytes + 4 * self.sizes.lora(lora) if lora is not None else 4 * n  # trained weights: fp32
            buffers = share * self.latent * 4
        decode = min(method.decode_batch or share, share)
        return self._training(stage, method, lora, extra + self.reward_bytes(tasks), train_rows, rollout_rows,
                              f"{micro} of {share}", decode, buffers, method.ema is not None)

    def routed_teachers(self) -> set[str]:
        spec = self.spec
        return {rule.teacher for rule in spec.router.rules} | ({spec.router.default} & set(spec.teachers))

    def sft(self) -> StageMemory:
        """Teacher samples in calls of sample_batch rows split over the GPUs, best-of-group scoring, fitting."""
        cold, spec = self.spec.cold_start, self.spec
        share = self.share(cold.batch_size, "cold_start.batch_size")
        micro = min(cold.micro_batch or share, share)
        call = self.sample_batch // self.gpus if self.sample_batch % self.gpus == 0 else self.sample_batch
        adapters = sum(self.adapter_bytes(self.teacher_lora(name)) for name in self.routed_teachers()
                       if name != "base")
        decode = 0
        if cold.best_of_group:
            if cold.decode_batch is None:
                raise SystemExit("cold_start.decode_batch null decodes all of a process's SFT samples at once, as "
                                 "many as its share of the train prompts: set decode_batch")
            decode = cold.decode_batch
        sampler = spec.evaluation.sampler if cold.target_sampler == "evaluation" else cold.sampler
        sampling_rows = min(cold.micro_batch or call, call) * (2 if sampler.cfg != 1 else 1)
        rewards = self.reward_bytes(spec.tasks) if cold.best_of_group else 0.0
        return self._training("cold_start sft", cold, self.lora_of(cold), adapters + rewards, micro, sampling_rows,
                              f"{micro} of {share}", decode, 0.0, ema=False)

    def opd(self) -> StageMemory:
        spec, s = self.spec, self.spec.opd
        share = self.share(s.prompts_per_step * s.group_size, "opd: prompts_per_step x group_size")
        micro = min(s.micro_batch or share, share)
        names = self.routed_teachers()
        if spec.mar.weight > 0:
            names.add(spec.mar.anchor)
        adapters = sum(self.adapter_bytes(self.teacher_lora(name)) for name in names if name != "base")
        guided = s.cfg_train and s.sampler.cfg != 1
        rollout_rows = micro * (2 if s.sampler.cfg != 1 else 1)
        trajectory = (s.sampler.steps + 1) * share * self.latent * 4
        return self._training("opd", s, self.student_lora(), adapters, micro * (2 if guided else 1), rollout_rows,
                              f"{micro} of {share}", 0, trajectory, s.ema is not None)

    def evaluation(self) -> StageMemory:
        """Every evaluated model: the base with the largest adapter among them, sampling calls of eval_batch prompts."""
        spec, e = self.spec, self.spec.evaluation
        loras = [self.teacher_lora(n) for n in spec.teachers] + [self.lora_of(spec.baseline.method),
                                                                 self.student_lora()]
        adapter = max((self.adapter_bytes(lora) for lora in loras if lora is not None), default=0.0)
        call = self.eval_batch
        micro = min(e.micro_batch or call, call)
        rows = self.row_bytes(self.student_lora())
        decode = min(e.decode_batch or call, call)
        activations = max(micro * (2 if e.sampler.cfg != 1 else 1) * rows.inference, decode * (rows.decode or 0))
        benchmarks = e.benchmarks or tuple(spec.tasks)
        frozen = self.base_bytes() + adapter + self.reward_bytes(benchmarks)
        return StageMemory("eval (each model)", f"{micro} of {call}", 0, frozen, self.sizes.text_encoders * self.bytes,
                           activations=activations)

    def stages(self) -> list[StageMemory]:
        spec = self.spec
        out = [StageMemory("base", note="records the pretrained model; loads nothing")]
        out += [self.teacher(f"teacher {name}", t.method, [t.task]) for name, t in spec.teachers.items()]
        out.append(self.teacher("baseline", spec.baseline.method, list(spec.baseline.weights)))
        method = spec.cold_start.method
        if method == "sft":
            out.append(self.sft())
        else:
            what = {"merge": "merges the teachers' adapter files on the host", "none": "OPD starts from the base"}
            out.append(StageMemory(f"cold_start {method}", note=f"loads no model: {what[method]}"))
        return [*out, self.opd(), self.evaluation()]


# ---------------------------------------------------------------- the printed plan
COLUMNS = ("frozen", "text_encoders", "adapter", "optimizer", "gradients", "activations")


def plan_text(planner: Planner, stages: list[StageMemory], gpu_gb: float) -> str:
    spec, sizes, model = planner.spec, planner.sizes, planner.spec.model
    usable = gpu_gb * (1 - HEADROOM)
    tokens = (model.resolution // 16) ** 2 + CLIP_TOKENS + model.max_sequence_length
    lines = []
    lines.append(f"{spec.name}: {planner.gpus} GPU(s) of {gpu_gb:g} GB, {usable:.1f} GB usable ({HEADROOM:.0%} held "
                 "back for the CUDA context, workspaces and fragmentation); GB = 1e9 bytes")
    lines.append(f"model: {sizes.source}; transformer {sizes.transformer / 1e9:.2f} B params in {model.dtype}, text "
                 f"encoders {sizes.text_encoders / 1e9:.2f} B (freed once a stage's prompts are embedded), VAE "
                 f"{sizes.vae / 1e6:.0f} M in {model.vae_dtype or model.dtype}")
    for rows in planner.rows.values():
        train = [f"{name} {value / GB:.3f}" for name, value in (("training", rows.train), (
            "with gradient checkpointing", rows.train_checkpointed)) if value is not None]
        lines.append(f"activations per row, measured ({sizes.transformer_config['num_layers']} layers, "
                     f"{model.resolution} px, {tokens} tokens), GB: {', '.join(train)}, inference "
                     f"{rows.inference / GB:.3f}; VAE decode {(rows.decode or 0) / GB:.3f} per image")
    header = ("stage", "micro-batch", "rows", "frozen", "text enc", "adapter", "optim", "grads", "activ", "peak")
    widths = (20, 11, 4, 7, 8, 7, 6, 6, 6, 6)
    lines += ["", " ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))
              + "  fits"]
    for s in stages:
        if s.note:
            lines.append(f"{s.stage:<20} {'-':>11} {'-':>4}  {s.note}")
            continue
        values = [getattr(s, c) / GB for c in COLUMNS] + [s.peak / GB]
        fits = "yes" if s.peak <= usable * GB else f"NO, {s.peak / GB - usable:.1f} GB over"
        lines.append(f"{s.stage:<20} {s.micro:>11} {s.rows or '-':>4} "
                     + " ".join(f"{v:>{w}.2f}" for v, w in zip(values, widths[3:], strict=True)) + f"  {fits}")
    lines.append("peak = frozen + adapter + optim + grads + the larger of text enc (before the first step) and "
                 "activ; rows: transformer rows per forward with gradients")
    return "\n".join(lines)


def shortfalls(stages: list[StageMemory], gpu_gb: float) -> list[str]:
    """One line per stage that does not fit, naming it and the shortfall."""
    usable = gpu_gb * (1 - HEADROOM) * GB
    return [f"stage {s.stage} needs {s.peak / GB:.1f} GB per GPU: {(s.peak - usable) / GB:.1f} GB more than the "
            f"{usable / GB:.1f} GB usable of {gpu_gb:g} GB; lower its micro_batch or decode_batch"
            + (" or turn on gradient_checkpointing" if s.checkpointing is False else "")
            for s in stages if s.peak > usable]

"""Device check: one teacher step, one OPD step and one evaluation batch on an SD3.5-Medium-shaped transformer.

Run (one GPU, a few minutes; no hub access needed, everything is built from configs and randomly initialised):

    .venv/bin/python benchmarks/gpu_check.py                       # 24 layers, bf16, 512 px, LoRA r 32 / alpha 64
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --layers 1 --resolution 64 --dtype fp32 \\
        --steps 2 --eval-steps 2 --text-tokens 32 --prompts 1 --group 2 --pos-embed-max-size 64   # CPU, tests

The model: diffusers' SD3Transformer2DModel with stabilityai/stable-diffusion-3.5-medium's transformer config
(24 layers, 24 heads x 64, dual attention in the first 13, joint attention 4096, pooled 2048) and SD3's VAE
(16 latent channels), randomly initialised in `--dtype`. The text encoders are left out: prompts get fixed random
embeddings of SD3's shape (77 CLIP + 256 T5 tokens x 4096, pooled 2048), as a run that encodes its prompts once up
front sees them. The reward is a stand-in (mean brightness): scoring is not what this measures.
By default each phase runs one process's share of the spec's step on 8 GPUs (`--gpus`): teacher 48 / 8 prompts x 24
images = 144, OPD its prompts / 8 x 16, through the spec's micro-batches and gradient checkpointing, with prompt
embeddings of the spec's length (77 + model.max_sequence_length tokens), so a GPU run of it measures what a real run
does per GPU. The steps are the project's own: GRPOTrainer.step (specs/sd3/flow_opd.yaml's teacher settings: SDE sampler, all 9
trainable steps, CFG 4.5 in training, KL to the adapter-off reference), OPDTrainer.step (its OPD settings: element
credit, three frozen teacher adapters and the MAR anchor on the same transformer, lambda 0.02) and
flowopd.evaluation.benchmark.generate (its evaluation sampler: 40 Euler steps, CFG 4.5, then the VAE decode). Every phase runs
`--repeat` times; the last one is reported (the first pays for kernel selection and allocator warm-up).

Prints per phase: seconds per step, images per second, peak memory (CUDA: max allocated; CPU: the process's peak
resident set), and beside them the README's arithmetic: forward FLOPs counted at this configuration
(FlopCounterMode on the meta device) times the forwards per image (teacher 74, OPD 92, evaluation 80 at the spec's
steps), at 250-400 TFLOP/s (25-40 % of an H100's bf16 dense peak).
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_memory import SD35M, reset_peak, vm  # SD3.5-M's transformer config, /proc memory helpers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEACHERS = ("geneval", "ocr", "pickscore")  # OPD's routed teachers; the MAR anchor is a fourth adapter (deqa)
ASSUMED_TFLOPS = (250, 400)


def build_bundle(args, device: torch.device):
    """An SD3Bundle over an SD3.5-M-shaped transformer and SD3's VAE, random, in args.dtype, text encoders left out
    (encode gives fixed random embeddings per prompt)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from flowopd.models.bundle import Condition
    from flowopd.models.sd3 import SD3Bundle

    dual = round(args.layers * 13 / 24)
    config = {**SD35M, "num_layers": args.layers, "dual_attention_layers": tuple(range(dual)),
              "pos_embed_max_size": args.pos_embed_max_size}
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(DTYPES[args.dtype])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                            use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
                            sample_size=args.resolution).to(DTYPES[args.dtype])
    text_tokens = args.text_tokens

    class EmbeddedPrompts(SD3Bundle):
        @torch.no_grad()
        def encode(self, texts: list[str]) -> Condition:
            rows = []
            for text in texts:  # the same prompt always gets the same embedding
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
                generator = torch.Generator().manual_seed(seed)
                rows.append((torch.randn(text_tokens, 4096, generator=generator),
                             torch.randn(2048, generator=generator)))
            embeds = torch.stack([r[0] for r in rows]).to(device, self.transformer.dtype)
            pooled = torch.stack([r[1] for r in rows]).to(device, self.transformer.dtype)
            return Condition(prompt_embeds=embeds, pooled=pooled)

    bundle = EmbeddedPrompts.from_components(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                                             text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                             tokenizer_3=None, resolution=args.resolution)
    return bundle, config


def brightness(images: np.ndarray, prompts) -> dict:
    """The stand-in reward: mean pixel value in [0, 1]."""
    return {"score": images.reshape(len(images), -1).mean(axis=1) / 255.0}


def forward_flops(config: dict, resolution: int, text_tokens: int) -> float:
    """FLOPs of one forward of one CFG row, counted on the meta device."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    side = resolution // 8
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
        inputs = {"hidden_states": torch.randn(1, 16, side, side), "timestep": torch.full((1,), 500.0),
                  "encoder_hidden_states": torch.randn(1, text_tokens, 4096),
                  "pooled_projections": torch.randn(1, 2048)}
    with FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)
    return counter.get_total_flops()


class Peak:
    """Peak memory of a phase: CUDA max allocated, or on CPU the resident set's high-water mark (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()

    def gb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        return vm("VmHWM") / 1e9 if Path("/proc/self/status").exists() else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timed(run, repeat: int, peak: Peak, device: torch.device) -> tuple[float, float]:
    """(seconds of the last of `repeat` runs, peak GB over them)."""
    peak.reset()
    seconds = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, peak.gb()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the run: each process's share of a step is "
                        "the spec's prompts_per_step / gpus prompts x group_size (the default batch measured)")
    parser.add_argument("--prompts", type=int, help="prompts per step (teacher and OPD; default: the share)")
    parser.add_argument("--group", type=int, help="images per prompt (teacher and OPD; default: the spec's)")
    parser.add_argument("--eval-batch", type=int, default=8, help="prompts in the evaluation batch (the sd3 eval's)")
    parser.add_argument("--steps", type=int, help="rollout sampler steps (default: the spec's, 10)")
    parser.add_argument("--eval-steps", type=int, help="evaluation sampler steps (default: the spec's, 40)")
    parser.add_argument("--text-tokens", type=int, help="prompt embedding length (default: 77 CLIP tokens + the "
                        "spec's model.max_sequence_length of T5)")
    parser.add_argument("--pos-embed-max-size", type=int, default=SD35M["pos_embed_max_size"])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each phase; the last is reported")
    parser.add_argument("--spec", type=Path, default=ROOT / "specs/sd3/flow_opd.yaml")
    args = parser.parse_args(argv)

    from flowopd.evaluation.benchmark import generate
    from flowopd.methods.grpo import GRPOTrainer
    from flowopd.methods.opd_trainer import OPDTrainer
    from flowopd.spec import load_spec
    from flowopd.train.policy import ADAPTER
    from flowopd.world.prompt_sets import FilePrompt

    device = torch.device(args.device)
    spec = load_spec(args.spec)
    args.text_tokens = args.text_tokens or 77 + spec.model.max_sequence_length
    rollout = {} if args.steps is None else {"steps": args.steps}

    def one_process(method):
        """The method at one process's share of its step, through its own micro-batches and checkpointing."""
        prompts = args.prompts or max(1, method.prompts_per_step // args.gpus)
        batch = {"prompts_per_step": prompts, "group_size": args.group or method.group_size}
        return method.model_copy(update=batch | {"sampler": method.sampler.model_copy(update=rollout)})

    grpo, opd = one_process(spec.teachers["ocr"].method), one_process(spec.opd)
    args.prompts = max(grpo.prompts_per_step, opd.prompts_per_step)
    evaluation = spec.evaluation.sampler.model_copy(update={} if args.eval_steps is None else
                                                    {"steps": args.eval_steps})
    lora = spec.model.lora
    prompts = [FilePrompt(text=f"prompt {i}: a photo of {i} red apples", task=TEACHERS[i % 3], kind="check")
               for i in range(max(args.prompts, args.eval_batch) * 3)]
    peak = Peak(device)

    start = time.perf_counter()
    bundle, config = build_bundle(args, device)
    params = sum(p.numel() for p in bundle.transformer.parameters())
    print(f"one process of {args.gpus}: teacher {grpo.prompts_per_step} x {grpo.group_size} images (micro-batch "
          f"{grpo.micro_batch or 'whole'}), OPD {opd.prompts_per_step} x {opd.group_size} (micro-batch "
          f"{opd.micro_batch or 'whole'}), gradient checkpointing {grpo.gradient_checkpointing}")
    print(f"SD3.5-M-shaped transformer: {args.layers} layers, {params / 1e9:.3f} B parameters, {args.dtype}, "
          f"{args.resolution} px, {args.text_tokens} text tokens, on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f"; built in {time.perf_counter() - start:.1f} s")
    flops = forward_flops(config, args.resolution, args.text_tokens)
    trained = max(1, round((grpo.sampler.steps - 1) * grpo.timestep_fraction))
    per_image = {  # forwards of one CFG row per image, the README's counting (backward ~ 1 forward, frozen base)
        "teacher": 2 * grpo.sampler.steps + 2 * trained * 2 + 2 * trained,  # rollout + train + KL reference
        "opd": 2 * opd.sampler.steps + 2 * trained * 2 + 2 * trained + 2 * trained,  # + teacher + anchor
        "eval": 2 * evaluation.steps,
    }
    results = []

    # one teacher step: GRPO with the student's LoRA adapter, the reference = adapters off
    teacher = GRPOTrainer(bundle, grpo, prompts, np.zeros(len(prompts), dtype=int), [brightness], ["brightness"],
                          [1.0], seed=0, lora=lora)
    seconds, gb = timed(lambda: teacher.step(0), args.repeat, peak, device)
    results.append({"phase": "teacher", "images": grpo.prompts_per_step * grpo.group_size, "seconds": seconds,
                    "gb": gb})
    bundle.transformer.delete_adapters(ADAPTER)

    # one OPD step: three frozen teacher adapters and the anchor beside the student's, switched per routed forward
    for name in (*TEACHERS, "deqa"):
        bundle.add_lora(name, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, trainable=False)
    teachers = {name: bundle.adapter_velocity(name) for name in TEACHERS}
    student = OPDTrainer(bundle, opd, prompts, [p.task for p in prompts], teachers, bundle.adapter_velocity("deqa"),
                         spec.mar.weight, seed=0, lora=lora)
    bundle.set_adapter(ADAPTER)
    seconds, gb = timed(lambda: student.step(0), args.repeat, peak, device)
    results.append({"phase": "opd", "images": opd.prompts_per_step * opd.group_size, "seconds": seconds, "gb": gb})

    # one evaluation batch: the evaluation sampler (Euler ODE, CFG) and the VAE decode
    bundle.transformer.eval()
    batch_prompts = prompts[: args.eval_batch]
    seconds, gb = timed(lambda: generate(bundle, batch_prompts, evaluation, 0, args.eval_batch,
                                         micro_batch=spec.evaluation.micro_batch,
                                         decode_batch=spec.evaluation.decode_batch), args.repeat, peak, device)
    results.append({"phase": "eval", "images": args.eval_batch, "seconds": seconds, "gb": gb})

    print(f"forward of one CFG row: {flops / 1e12:.3f} TFLOP; forwards per image: "
          + ", ".join(f"{k} {v}" for k, v in per_image.items()))
    print(f"{'phase':8s} {'images':>6s} {'s/step':>8s} {'images/s':>9s} {'peak GB':>8s}   "
          f"estimate at {ASSUMED_TFLOPS[0]}-{ASSUMED_TFLOPS[1]} TFLOP/s")
    for row in results:
        tflop = per_image[row["phase"]] * flops / 1e12
        low, high = (row["images"] * tflop / rate for rate in reversed(ASSUMED_TFLOPS))
        row |= {"images_per_s": row["images"] / row["seconds"], "tflop_per_image": tflop,
                "estimate_s": (low, high)}
        print(f"{row['phase']:8s} {row['images']:6d} {row['seconds']:8.2f} {row['images_per_s']:9.3f} "
              f"{row['gb']:8.1f}   {low:.3g}-{high:.3g} s/step, {row['images'] / high:.3g}-{row['images'] / low:.3g} "
              f"images/s ({tflop:.3g} TFLOP per image)")
    return results


if __name__ == "__main__":
    main()

"""Memory of Flow-OPD's models: a full transformer copy per teacher (reference code) vs LoRA adapters on one base.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --layers 2 --resolution 256

Two plans for OPD's five models (the trained student, 3 task teachers, the MAR anchor):
- copy:    5 full transformers (student = base + its LoRA adapter; teachers and anchor = frozen full copies, as the
           reference code loads a merged LoRA teacher per routed task);
- adapter: 1 frozen base + 5 LoRA adapters (student trainable, 4 frozen), switched per routed group.
Each plan runs in a fresh subprocess (so memory freed by one cannot hide the other) on an SD3.5-Medium-shaped,
randomly initialised SD3Transformer2DModel of reduced depth (SD3.5-M's width: 24 heads x 64, joint attention 4096,
caption projection 1536, pooled 2048, patch 2, 16 latent channels, qk RMS norm, dual attention in the first 13/24
of the layers; pos_embed_max_size cut to 64 from 384 so the 384^2 x 1536 position table, a buffer, does not
dominate a 2-layer model; the extrapolation counts it), fp32 on CPU, LoRA r 32 / alpha 64 on Flow-GRPO's targets.
In each: one forward + backward of the student with CFG (2 rows: unconditional and conditional) and one AdamW step.
Peak memory = the process's peak resident set (VmHWM, reset after imports and inputs) minus its resident set then.

Then the arithmetic for the full 24-layer SD3.5-M in bf16, from parameter counts of the real configs built on
PyTorch's meta device (no memory, no download).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

from flowopd.pipeline.memory_probe import (  # SD3.5-M's configs and the /proc helpers live in the memory plan's probe
    GB,
    SD35M,
    SD35M_ID,
    SD35M_TEXT,
    SD35M_VAE,
    model_sizes,
    reset_peak,
    sizes_from_configs,
    vm,
)
from flowopd.spec import LoraSettings

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out"]  # Flow-GRPO's LoRA targets (flowopd.models.sd3.SD3_LORA_TARGETS)
RANK, ALPHA, MODELS = 32, 64, 5  # student + 3 teachers + anchor
TEXT_TOKENS = 77 + 256  # CLIP (77) + T5 (max_sequence_length 256) tokens of SD3's prompt embedding


def bench_config(layers: int) -> dict:
    dual = round(layers * 13 / 24)
    return {**SD35M, "num_layers": layers, "dual_attention_layers": tuple(range(dual)), "pos_embed_max_size": 64}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian")


# ---------------------------------------------------------------- one plan, in its own process
def run_plan(plan: str, layers: int, resolution: int) -> dict:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    side = resolution // 8
    x = torch.randn(2, 16, side, side)
    text = torch.randn(2, TEXT_TOKENS, 4096)
    pooled = torch.randn(2, 2048)
    sigma = torch.full((2,), 700.0)
    rss0 = vm("VmRSS")
    reset_peak()

    base = SD3Transformer2DModel(**bench_config(layers))
    base.requires_grad_(False)
    copies = []
    if plan == "copy":
        copies = [copy.deepcopy(base) for _ in range(MODELS - 1)]  # teachers + anchor: full frozen models
        base.add_adapter(lora_config(), adapter_name="student")
    else:
        for name in ("student", "teacher_0", "teacher_1", "teacher_2", "anchor"):
            base.add_adapter(lora_config(), adapter_name=name)
        base.set_adapter("student")
    trainable = [p for n, p in base.named_parameters() if ".student." in n]
    for p in trainable:
        p.requires_grad_(True)
    weights = vm("VmRSS") - rss0
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    before = vm("VmRSS")
    start = time.perf_counter()
    v = base(hidden_states=x, timestep=sigma, encoder_hidden_states=text, pooled_projections=pooled,
             return_dict=False)[0]
    v_u, v_c = v.chunk(2)
    (v_u + 4.5 * (v_c - v_u)).square().mean().backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = vm("VmHWM") - rss0
    return {
        "plan": plan,
        "peak_bytes": peak,
        "weights_bytes": weights,
        "step_bytes": vm("VmHWM") - before,
        "seconds": seconds,
        "transformers": 1 + len(copies),
        "params_per_copy": sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n),
        "lora_params_per_adapter": sum(p.numel() for p in trainable),
        "tokens_per_row": (side // 2) ** 2 + TEXT_TOKENS,
    }


# ---------------------------------------------------------------- the full model, counted on the meta device
def full_model_counts() -> dict:
    """flowopd.pipeline.memory_probe's counts of SD3.5-M's components (its configs built on the meta device)."""
    sizes = model_sizes(SD35M_ID)
    t5 = sizes_from_configs("T5", SD35M, SD35M_VAE, {"text_encoder_3": SD35M_TEXT["text_encoder_3"]}).text_encoders
    return {"transformer": sizes.transformer, "pos_embed": sizes.position_table,
            "lora": sizes.lora(LoraSettings(rank=RANK, alpha=ALPHA, target_modules=TARGETS)),
            "encoders": sizes.text_encoders, "t5": t5, "vae": sizes.vae}


def forward_flops_512() -> float:
    """FLOPs of one SD3.5-M forward of one row at 512 px (1024 image + 333 text tokens), counted on meta tensors."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35M)
        inputs = {"hidden_states": torch.randn(1, 16, 64, 64), "timestep": torch.full((1,), 500.0),
                  "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 4096), "pooled_projections": torch.randn(1, 2048)}
    with FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)
    return counter.get_total_flops()


def extrapolate(results: dict, layers: int) -> None:
    c = full_model_counts()
    bf16, student_state = 2, 16  # student adapter: fp32 weights + grad + AdamW m, v = 16 bytes / parameter
    copy_gb = (c["transformer"] + c["pos_embed"]) * bf16 / GB
    adapter_gb = c["lora"] * bf16 / GB
    student_gb = c["lora"] * student_state / GB
    shared_gb = (c["encoders"] + c["vae"]) * bf16 / GB
    plan_copy = MODELS * copy_gb + student_gb
    plan_adapter = copy_gb + (MODELS - 1) * adapter_gb + student_gb
    print("\nFull SD3.5-Medium in bf16 (parameter counts of the real configs, built on the meta device):")
    print(f"  transformer {c['transformer'] / 1e9:.3f} B params + position table {c['pos_embed'] / 1e6:.1f} M "
          f"-> one copy = {c['transformer'] + c['pos_embed']:,} x 2 B = {copy_gb:.2f} GB")
    print(f"  LoRA r {RANK} on {len(TARGETS)} projection kinds: {c['lora'] / 1e6:.2f} M params per adapter "
          f"-> {adapter_gb * 1e3:.1f} MB frozen (bf16); trained student {c['lora'] / 1e6:.2f} M x 16 B "
          f"(fp32 weight, grad, AdamW m, v) = {student_gb:.2f} GB")
    print(f"  copy plan:    {MODELS} x {copy_gb:.2f} + {student_gb:.2f} = {plan_copy:.2f} GB")
    print(f"  adapter plan: {copy_gb:.2f} + {MODELS - 1} x {adapter_gb:.4f} + {student_gb:.2f} = {plan_adapter:.2f} GB"
          f"   (ratio {plan_copy / plan_adapter:.2f}x)")
    print(f"  both plans also hold the text encoders ({c['encoders'] / 1e9:.2f} B params, T5-XXL "
          f"{c['t5'] / 1e9:.2f} B of them) and the VAE ({c['vae'] / 1e6:.0f} M): {shared_gb:.2f} GB in bf16, "
          f"unless prompts are encoded once up front and the encoders freed")
    step = results["adapter"]
    per_layer_row_token = step["step_bytes"] / layers / 2 / step["tokens_per_row"]
    tokens_512 = (512 // 16) ** 2 + TEXT_TOKENS
    act_gb = per_layer_row_token * 24 * 2 * tokens_512 / 2 / GB  # 24 layers, 2 CFG rows, 512 px, bf16 = fp32 / 2
    print(f"  activations (rough, linear in layers and tokens from this run's student step: "
          f"{per_layer_row_token / 1e3:.1f} kB fp32 per layer, CFG row and token): 24 layers x 2 rows x "
          f"{tokens_512} tokens at 512 px / 2 (bf16) = {act_gb:.1f} GB per sample without gradient checkpointing")
    print(f"  per GPU at one training sample: copy plan ~{plan_copy + shared_gb + act_gb:.0f} GB, adapter plan "
          f"~{plan_adapter + shared_gb + act_gb:.0f} GB (add {act_gb:.1f} GB per further sample in the micro-batch; "
          "`flowopd spec plan SPEC --gpu-memory GB` measures a spec's stages)")
    flops = forward_flops_512()
    print(f"  compute: one forward of one CFG row at 512 px = {flops / 1e12:.2f} TFLOP (FlopCounterMode, meta device)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer depth of the measured model (SD3.5-M: 24)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--child", choices=("copy", "adapter"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(run_plan(args.child, args.layers, args.resolution)))
        return
    results = {}
    for plan in ("copy", "adapter"):
        command = [sys.executable, __file__, "--child", plan, "--layers", str(args.layers),
                   "--resolution", str(args.resolution)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[plan] = json.loads(done.stdout.strip().splitlines()[-1])
    first = results["copy"]
    print(f"SD3.5-M-shaped transformer, {args.layers} layers, {first['params_per_copy'] / 1e6:.1f} M params per copy, "
          f"LoRA {first['lora_params_per_adapter'] / 1e6:.2f} M per adapter, {args.resolution} px "
          f"({first['tokens_per_row']} tokens per row), fp32, CPU, 1 thread")
    print(f"{'plan':<8} {'transformers':>12} {'weights GB':>11} {'step GB':>8} {'peak GB':>8} {'step s':>7}")
    for plan, r in results.items():
        print(f"{plan:<8} {r['transformers']:>12} {r['weights_bytes'] / GB:>11.2f} {r['step_bytes'] / GB:>8.2f} "
              f"{r['peak_bytes'] / GB:>8.2f} {r['seconds']:>7.1f}")
    ratio = results["copy"]["peak_bytes"] / results["adapter"]["peak_bytes"]
    print(f"peak memory ratio copy / adapter: {ratio:.2f}x")
    extrapolate(results, args.layers)


if __name__ == "__main__":
    main()

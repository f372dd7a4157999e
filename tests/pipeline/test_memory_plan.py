"""The memory plan (flowopd/pipeline/memory_plan.py): its predicted peak of a training step against the measured
one, and `flowopd spec plan` naming the stage that does not fit."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from flowopd.cli import main
from flowopd.pipeline.memory_plan import Planner, plan_text
from flowopd.pipeline.memory_probe import (
    CLIP_TOKENS,
    PROBE_ENV,
    SD35M,
    SD35M_VAE,
    TORCH_DTYPES,
    block_kinds,
    measure_rows,
    reset_peak,
    sizes_from_configs,
    training_step_peak,
    vm,
)
from flowopd.spec import LoraSettings, SD3Model, load_spec

ROOT = Path(__file__).resolve().parents[2]
FLOW_GRPO_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")
MODEL = {"kind": "sd3", "pretrained": "unused", "resolution": 256, "dtype": "fp16", "max_sequence_length": 32}


def sd3_shaped(layers: int) -> dict:
    """SD3.5-M's width, cut to `layers` blocks (SD3.5's second attention in the first 13/24 of them)."""
    return {**SD35M, "num_layers": layers, "dual_attention_layers": tuple(range(round(layers * 13 / 24))),
            "pos_embed_max_size": 64}


def measure_step(request: dict) -> int:
    """Peak bytes of one training step as the trainers run it: the frozen transformer in fp16, an fp32 LoRA
    (flowopd.train.policy.prepare_policy), one sample's guided velocity (2 CFG rows, the unconditional branch
    detached), backward, AdamW. The process's peak resident set above its set before the model was built."""
    from diffusers import SD3Transformer2DModel

    from flowopd.models.bundle import Condition, transformer_velocity
    from flowopd.train.policy import enable_gradient_checkpointing, make_optimizer, prepare_policy

    torch.manual_seed(0)
    dtype, side, tokens = TORCH_DTYPES[request["dtype"]], request["resolution"] // 8, request["text_tokens"]
    x = torch.randn(1, 16, side, side, dtype=dtype)
    cond, null = (Condition(torch.randn(1, tokens, 4096, dtype=dtype), torch.randn(1, 2048, dtype=dtype))
                  for _ in range(2))
    rss = vm("VmRSS")
    bundle = types.SimpleNamespace(transformer=SD3Transformer2DModel.from_config(request["config"]).to(dtype))
    params = list(prepare_policy(bundle, LoraSettings(**request["lora"])).values())
    if request["checkpointing"]:
        enable_gradient_checkpointing(bundle.transformer)
    optimizer = make_optimizer(params, 1e-4)
    bundle.transformer.train()
    reset_peak()  # building in fp32 then casting is not the step's memory
    v = transformer_velocity(bundle.transformer, x, 0.5, cond, null, 4.5, detach_uncond=True)
    v.float().square().mean().backward()
    optimizer.step()
    return vm("VmHWM") - rss


@pytest.mark.parametrize("layers, checkpointing", [(2, False), (4, True)])
def test_predicted_peak_of_a_training_step_is_within_20_percent_of_the_measured(layers, checkpointing):
    """2 layers: the probe is the model itself; 4 layers: extrapolated from a probe of one block per kind."""
    config = sd3_shaped(layers)
    lora = LoraSettings(rank=32, alpha=64.0, target_modules=FLOW_GRPO_TARGETS)
    sizes = sizes_from_configs("test", config, SD35M_VAE, {})
    rows = measure_rows(sizes, SD3Model(**MODEL), lora, {checkpointing}, decode=False)
    predicted = training_step_peak(sizes, rows, lora, "fp16", n_rows=2, checkpointing=checkpointing)
    request = {"config": config, "dtype": "fp16", "resolution": MODEL["resolution"], "checkpointing": checkpointing,
               "text_tokens": CLIP_TOKENS + MODEL["max_sequence_length"], "lora": lora.model_dump(mode="json")}
    done = subprocess.run([sys.executable, __file__, json.dumps(request)], capture_output=True, text=True,
                          env=os.environ | PROBE_ENV, check=True)
    measured = int(done.stdout.split()[-1])
    weights = (sizes.transformer + sizes.position_table) * 2
    assert measured > weights * 1.02  # the step's own memory is not lost in the weights' noise
    assert abs(predicted - measured) / measured < 0.20, (predicted, measured)
    assert abs((predicted - weights) - (measured - weights)) / (measured - weights) < 0.20, (predicted, measured)


def test_block_kinds_follow_the_configs_layers():
    assert block_kinds(SD35M).count("joint+dual") == 13 and block_kinds(SD35M)[-1] == "last"
    assert block_kinds(SD35M).count("joint") == 10


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    """specs/sd3/flow_opd.yaml pointed at a tiny random SD3 pipeline folder."""
    from tiny_sd3 import RESOLUTION, TEXT_LEN, tiny_sd3_bundle

    folder = tmp_path_factory.mktemp("plan")
    tiny_sd3_bundle().pipe.save_pretrained(folder / "models" / "tiny_sd3")
    spec = yaml.safe_load((ROOT / "specs/sd3/flow_opd.yaml").read_text())
    spec["model"] |= {"pretrained": "models/tiny_sd3", "resolution": RESOLUTION, "max_sequence_length": TEXT_LEN,
                      "lora": {"rank": 2, "alpha": 4.0}}
    (folder / "tiny.yaml").write_text(yaml.safe_dump(spec))
    sft = yaml.safe_load((ROOT / "specs/sd3/sft_init.yaml").read_text())
    (folder / "sft.yaml").write_text(yaml.safe_dump(spec | {"cold_start": sft["cold_start"]}))
    return folder


def plan(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["spec", "plan", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_plan_lists_every_model_stage_with_its_share_and_adapter(tiny_spec, monkeypatch):
    monkeypatch.chdir(tiny_spec)
    planner = Planner(load_spec("tiny.yaml"), gpus=8, eval_batch=8, sample_batch=64)
    stages = {s.stage: s for s in planner.stages()}
    assert list(stages) == ["base", "teacher deqa", "teacher geneval", "teacher ocr", "teacher pickscore", "baseline",
                            "cold_start merge", "opd", "eval (each model)"]
    teacher, opd = stages["teacher ocr"], stages["opd"]
    assert (teacher.micro, teacher.rows, opd.micro, opd.rows) == ("16 of 144", 32, "8 of 32", 16)  # CFG: 2 rows
    n = planner.sizes.lora(planner.spec.model.lora)  # r 2; OPD trains the product merge of 4 teachers: r 8
    assert (teacher.adapter, teacher.optimizer, teacher.gradients) == (8 * n, 8 * n, 4 * n)  # fp32 + EMA copy
    assert opd.adapter == 4 * teacher.adapter and stages["teacher pickscore"].frozen > teacher.frozen  # ViT-H
    assert stages["base"].peak == 0 and all(s.peak > s.frozen > 0 for s in list(stages.values())[1:] if not s.note)
    text = plan_text(planner, list(stages.values()), 80)
    assert "the configs in models/tiny_sd3" in text and "with gradient checkpointing" in text


def test_plan_of_an_sft_cold_start(tiny_spec, monkeypatch, capsys):
    monkeypatch.chdir(tiny_spec)
    status, out, err = plan(capsys, "sft.yaml", "--gpu-memory", "80", "--gpus", "8")
    assert status == 0, err
    assert re.search(r"^cold_start sft +4 of 4 +4 ", out, flags=re.MULTILINE)  # batch 32 / 8, fitted at cfg 1


def test_plan_exits_non_zero_naming_the_stage_and_the_shortfall(tiny_spec, monkeypatch, capsys):
    monkeypatch.chdir(tiny_spec)
    status, out, err = plan(capsys, "tiny.yaml", "--gpu-memory", "1", "--gpus", "8")  # PickScore's ViT-H: ~3.9 GB
    assert status == 1
    assert "stage teacher pickscore needs" in err and "GB more than the 0.9 GB usable of 1 GB" in err
    assert "stage teacher ocr" not in err  # a tiny model without PickScore fits
    assert "NO," in out


def test_plan_refuses_the_tiny_world_and_a_batch_that_does_not_split(tiny_spec, monkeypatch, capsys):
    status, _, err = plan(capsys, str(ROOT / "specs/flow_opd.yaml"), "--gpu-memory", "80")
    assert status == 1 and "the memory plan is for sd3 specs" in err
    monkeypatch.chdir(tiny_spec)
    status, _, err = plan(capsys, "tiny.yaml", "--gpu-memory", "80", "--gpus", "7")
    assert status == 1 and "1152 does not split over 7 GPUs" in err


if __name__ == "__main__":  # measure_step in a fresh process
    print(measure_step(json.loads(sys.argv[1])))

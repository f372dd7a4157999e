"""The hash chain from weights to evaluation: every phase checks each artifact folder it reads against the sha256
its producer recorded in meta.json, and refuses a changed, missing or added file before any compute, naming the
file and both hashes. Nothing is written when it refuses."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.phases.cold_start import run_cold_start
from flowopd.phases.data import run_data
from flowopd.phases.eval import run_eval
from flowopd.phases.opd import run_opd
from flowopd.phases.teacher import run_teacher
from flowopd.runtime.artifacts import ArtifactError, atomic_folder, sha256_file, write_provenance
from flowopd.spec import load_spec

MICRO = Path(__file__).parents[1] / "data" / "micro.yaml"
TEACHERS = ("text", "objects", "quality")


@pytest.fixture(scope="module")
def spec():
    return load_spec(MICRO)


@pytest.fixture
def world(tmp_path, spec):
    """Prompt sets and a random base and teachers, each written as a phase writes it (meta.json with file hashes)."""
    run_data(spec, tmp_path / "data")
    torch.manual_seed(0)
    for name in ("base", *TEACHERS):
        with atomic_folder(tmp_path / name) as folder:
            TinyBundle(tiny_model_config(spec)).eval().save(folder)
            write_provenance(folder, "teacher", {}, weights_sha256=sha256_file(folder / "model.safetensors"))
    return tmp_path


def flip_signs(path: Path) -> None:
    """A valid safetensors file with every float's sign bit flipped: loads fine, scores nonsense."""
    save_file({k: -v if v.is_floating_point() else v for k, v in load_file(path).items()}, path)


def left_behind(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name.startswith("out"))


def test_flipped_teacher_weights_are_refused_before_evaluation(world, spec):
    weights = world / "text" / "model.safetensors"
    recorded = sha256_file(weights)
    flip_signs(weights)
    with pytest.raises(ArtifactError) as refused:
        run_eval(spec, world / "text", world / "data", "teacher:text", world / "out", world / "out.json",
                 progress=False)
    message = str(refused.value)
    assert str(weights) in message and recorded in message and sha256_file(weights) in message
    assert left_behind(world) == []  # no shard, no metrics, no staging folder


def test_an_edited_prompt_set_is_refused_before_training(world, spec):
    prompts = world / "data" / "quality.train.jsonl"
    prompts.write_text(prompts.read_text().replace("a ", "an ", 1))
    with pytest.raises(ArtifactError, match=r"quality\.train\.jsonl: sha256 [0-9a-f]{64} differs from [0-9a-f]{64}"):
        run_teacher(spec, "quality", world / "base", world / "data", world / "out", world / "out.csv", progress=False)
    assert left_behind(world) == []


def test_a_changed_teacher_is_refused_by_the_merge_cold_start(world, spec):
    flip_signs(world / "objects" / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"objects/model\.safetensors: sha256"):
        run_cold_start(spec, world / "base", {n: world / n for n in TEACHERS}, None, world / "out", progress=False)
    assert left_behind(world) == []


@pytest.mark.parametrize("tamper", ["init", "anchor", "config"])
def test_opd_refuses_a_changed_student_init_anchor_or_model_config(world, spec, tamper):
    """The student's start (the cold start), the MAR anchor (a teacher) and a config file beside the weights."""
    target = {"init": world / "base" / "model.safetensors",
              "anchor": world / spec.mar.anchor / "model.safetensors",
              "config": world / "text" / "model_config.json"}[tamper]
    if target.suffix == ".json":
        target.write_text(target.read_text().replace("{", '{"extra": 1, ', 1))
    else:
        flip_signs(target)
    with pytest.raises(ArtifactError, match=f"{target.name}: sha256"):
        run_opd(spec, world / "base", world / "base", {n: world / n for n in TEACHERS}, world / "data", world / "out",
                world / "out.csv", progress=False)
    assert left_behind(world) == [] and not (world / "out.ckpt").exists()


@pytest.mark.parametrize("change", ["deleted", "added", "no record"])
def test_a_missing_added_or_unrecorded_file_is_refused(world, spec, change):
    folder = world / "text"
    if change == "deleted":
        (folder / "model_config.json").unlink()
        expected = r"model_config\.json: missing; its producer recorded sha256 [0-9a-f]{64}"
    elif change == "added":
        (folder / "extra.safetensors").write_bytes(b"x")
        expected = r"extra\.safetensors: not among the files its producer recorded"
    else:
        meta = json.loads((folder / "meta.json").read_text())
        del meta["files"]
        (folder / "meta.json").write_text(json.dumps(meta))
        expected = "meta.json records no file hashes"
    with pytest.raises(ArtifactError, match=expected):
        run_eval(spec, folder, world / "data", "teacher:text", world / "out", progress=False)
    assert left_behind(world) == []


def test_the_shard_records_the_hash_it_evaluated_and_the_one_its_producer_recorded(world, spec):
    """Fields the ledger compares: model_sha256 (hashed by the evaluation), model_recorded_sha256 (the producer's
    weights_sha256), and the shard's own files (metrics.json, samples.jsonl, grids) in `files`."""
    run_eval(spec, world / "text", world / "data", "teacher:text", world / "eval", progress=False)
    meta = json.loads((world / "eval" / "meta.json").read_text())
    weights = sha256_file(world / "text" / "model.safetensors")
    assert meta["model_sha256"] == meta["model_recorded_sha256"] == weights
    assert meta["files"]["metrics.json"] == sha256_file(world / "eval" / "metrics.json")
    assert {"samples.jsonl", "spec.json", "grid_text.png"} <= meta["files"].keys()

"""A reward server that dies in the middle of an evaluation loses no finished batch: the rerun takes the batches
already sampled and scored from where the failed run kept them and ends with the results of an uninterrupted run."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from reward_stubs import serving

from flowopd.evaluation import benchmark
from flowopd.evaluation.benchmark import ScoredBatches, evaluate
from flowopd.models.bundle import Condition
from flowopd.phases.data import run_data
from flowopd.phases.eval import kept_batches_folder
from flowopd.rewards.adversarial import render_all
from flowopd.rewards.remote import RemoteRewardError
from flowopd.rewards.server import RewardHTTPServer, in_process_scorer
from flowopd.spec import deep_merge, load_spec, validate_spec
from flowopd.world.prompt_sets import world_config

MICRO = Path(__file__).parents[1] / "data" / "micro.yaml"


class RenderingBundle:
    """A fake model: the ground truth of the prompts it last encoded, drawn with noise-dependent jitter (so each
    seed's images differ and a rerun draws the same ones); on_decode(n) is called with the count of decodes."""

    latent_shape = (3, 32, 32)

    def __init__(self, world, prompts, on_decode=lambda n: None):
        self.world, self.by_text, self.texts, self.decodes, self.on_decode = world, {p.text: p for p in prompts}, \
            [], 0, on_decode

    def encode(self, texts):
        self.texts = list(texts)
        return Condition(prompt_embeds=torch.zeros(len(texts), 1, 4), pooled=torch.zeros(len(texts), 4))

    def velocity(self, x, sigma, cond, cfg=1.0, transformer=None):
        return torch.zeros_like(x)

    def decode(self, x):
        self.decodes += 1
        self.on_decode(self.decodes)
        rng = np.random.default_rng(int(x.abs().sum() * 1e4))
        return render_all(self.world, [self.by_text[t] for t in self.texts], rng)


@pytest.fixture
def setting(tmp_path, monkeypatch):
    """(spec with objects scored by a remote server on a fixed port, data folder, prompts, port)."""
    monkeypatch.setattr(benchmark, "EVAL_BATCH", {"tiny": 2, "sd3": 8})  # 4 batches a seed, 8 in all
    with RewardHTTPServer(("127.0.0.1", 0), None) as probe:
        port = probe.server_address[1]
    remote = {"url": f"http://127.0.0.1:{port}/", "metrics": ["score", "strict"], "retries": 1, "backoff": 0.0}
    raw = deep_merge(load_spec(MICRO).model_dump(mode="json"), {
        "tasks": {"objects": {"reward": "remote", "remote": remote, "metric": "strict",
                              "prompts": {"n_test": 8}}},
        "evaluation": {"benchmarks": ["objects"], "n_prompts": 8}})
    spec = validate_spec(raw)
    run_data(spec, tmp_path / "data")
    prompts = benchmark.read_prompts(tmp_path / "data", "objects", "test")
    return spec, tmp_path / "data", prompts, port


def serve_objects(port, requests):
    scorer = in_process_scorer("objects")

    def recording(request):
        requests.append(list(request.prompts))
        return scorer(request)

    return RewardHTTPServer(("127.0.0.1", port), recording, quiet=True)


def run_in_thread(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


def test_a_rerun_after_the_server_died_keeps_every_finished_batch(setting, tmp_path):
    spec, data, prompts, port = setting
    world, kept = world_config(spec), ScoredBatches(tmp_path / "kept")
    clean_out, out = tmp_path / "clean", tmp_path / "resumed"
    clean_out.mkdir(), out.mkdir()
    with serving(in_process_scorer("objects")) as server:  # an uninterrupted run, for reference
        spec_clean = validate_spec(deep_merge(spec.model_dump(mode="json"),
                                              {"tasks": {"objects": {"remote": {"url": server.url}}}}))
        evaluate(RenderingBundle(world, prompts), spec_clean, data, clean_out, progress=False)

    server = run_in_thread(serve_objects(port, first := []))

    def die_at_third_batch(n):
        if n == 3:  # sampled, not yet scored
            server.shutdown()
            server.server_close()

    with pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: ConnectionRefusedError"):
        evaluate(RenderingBundle(world, prompts, die_at_third_batch), spec, data, None, progress=False, kept=kept)
    assert len(first) == 2
    kept_records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "kept").glob("*.json")}
    assert sorted(kept_records) == ["objects-0-0", "objects-0-2", "objects-0-4"]
    assert kept_records["objects-0-4"]["scores"] is None and kept_records["objects-0-2"]["scores"] is not None

    server = run_in_thread(serve_objects(port, second := []))
    try:
        bundle = RenderingBundle(world, prompts)
        evaluate(bundle, spec, data, out, progress=False, kept=kept)
    finally:
        server.shutdown()
        server.server_close()
    assert bundle.decodes == 8 - 3  # the three batches sampled before are not sampled again ...
    assert second[0] == [p.text for p in prompts[4:6]]  # ... and the kept third batch is scored first
    for name in ("metrics.json", "samples.jsonl"):
        assert (out / name).read_bytes() == (clean_out / name).read_bytes(), name


def test_kept_batches_from_other_weights_or_prompts_are_not_reused(setting, tmp_path):
    spec = setting[0]
    folder = kept_batches_folder(spec, tmp_path / "eval", "sha-a", clean=True)
    assert folder.parent == tmp_path and folder.name.startswith(".eval.scored-")
    ScoredBatches(folder).keep("objects", 0, 0, ["a", "b"], np.zeros((2, 4, 4, 3), np.uint8))
    other = kept_batches_folder(spec, tmp_path / "eval", "sha-b", clean=True)
    assert other != folder and not folder.exists()  # other weights: the old folder is stale, removed
    kept, images = ScoredBatches(other), np.ones((2, 4, 4, 3), np.uint8)
    kept.keep("objects", 0, 0, ["a", "b"], images)  # once sampled
    assert kept.load("objects", 0, 0, ["a", "b"])[1] is None
    kept.keep("objects", 0, 0, ["a", "b"], images, {"score": np.array([0.5, 1.0])})  # once scored
    images, scores = kept.load("objects", 0, 0, ["a", "b"])
    assert images.sum() == 2 * 4 * 4 * 3 and scores["score"].tolist() == [0.5, 1.0]
    assert kept.load("objects", 0, 0, ["a", "c"]) == (None, None)  # other prompts: sampled afresh
    assert ScoredBatches(None).load("objects", 0, 0, ["a", "b"]) == (None, None)


# ---------------------------------------------------------------- the split evaluated
def test_the_evaluation_scores_and_records_the_split_it_names(tmp_path):
    raw = deep_merge(load_spec(MICRO).model_dump(mode="json"), {"evaluation": {"benchmarks": ["objects"],
                                                                                "seeds": [0]}})
    data = tmp_path / "data"
    run_data(validate_spec(raw), data)
    # validation prompts of this test's own (three train prompts: none is a test prompt), whatever data wrote
    (data / "objects.val.jsonl").unlink(missing_ok=True)
    train = (data / "objects.train.jsonl").read_text().splitlines()[:3]
    (data / "objects.val.jsonl").write_text("\n".join(train) + "\n")
    splits = {split: benchmark.read_prompts(data, "objects", split) for split in ("val", "test")}
    assert not {p.text for p in splits["val"]} & {p.text for p in splits["test"]}
    for split, prompts in splits.items():
        spec = validate_spec(deep_merge(raw, {"evaluation": {"split": split}}))
        out = tmp_path / split
        out.mkdir()
        bundle = RenderingBundle(world_config(spec), splits["val"] + splits["test"])
        record = evaluate(bundle, spec, data, out, progress=False)
        assert record["split"] == json.loads((out / "metrics.json").read_text())["split"] == split
        assert record["benchmarks"]["objects"]["n"] == len(prompts)
        scored = [json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()]
        assert scored == [p.text for p in prompts], split

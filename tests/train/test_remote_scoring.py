"""Remote rewards score each decoded chunk of a rollout on a thread while the next chunks decode: the step is the one
an in-process reward gives, bit for bit, the scores land in their rows whatever answers first, and a failure is the
client's error."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from reward_stubs import serving

from flowopd.methods.grpo import GRPOTrainer
from flowopd.methods.pretrain import tiny_model_config
from flowopd.models.tiny import TinyBundle
from flowopd.rewards import get_reward
from flowopd.rewards.remote import RemoteRewardError
from flowopd.rewards.server import in_process_scorer
from flowopd.spec import GRPOSettings, RemoteSettings, load_spec
from flowopd.world import WorldConfig, make_prompt_set

MICRO = Path(__file__).resolve().parents[1] / "data" / "micro.yaml"
SETTINGS = {"group_size": 4, "prompts_per_step": 2, "steps": 1, "lr": 1e-3, "ema": None,
            "sampler": {"steps": 3, "shift": 3.0, "noise_level": 0.7, "cfg": 3.0}, "decode_batch": 2}


@pytest.fixture(scope="module")
def base_state():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return TinyBundle(tiny_model_config(load_spec(MICRO))).eval().state_dict()


def trainer_with(reward, base_state):
    bundle = TinyBundle(tiny_model_config(load_spec(MICRO)))
    bundle.load_state_dict(base_state)
    # single objects: the quality reward's graded floor tells an untrained model's samples apart (a scene of
    # several objects may score 0 in a whole group, and a step of such groups trains nothing)
    prompts = make_prompt_set(WorldConfig(quality_families=("single",)), "quality", 8, 0, "train")
    return GRPOTrainer(bundle.eval(), GRPOSettings(**SETTINGS), prompts, np.zeros(len(prompts), dtype=int),
                       [reward], ["quality"], [1.0], seed=0)


def test_a_remote_reward_scores_chunks_on_threads_and_trains_as_in_process(base_state):
    local = trainer_with(get_reward("quality"), base_state)
    local_row = local.step(0)
    scorer, requests = in_process_scorer("quality"), []
    last_chunk_decoded = threading.Event()

    def recording(request):
        requests.append((len(request.prompts), request.metrics))
        if len(requests) == 1:  # the first chunk's answer waits until the rollout has decoded its last chunk
            requests.append(("decoding went on", last_chunk_decoded.wait(20)))
        return scorer(request)

    with serving(recording) as server:
        reward = get_reward("remote", settings=RemoteSettings(url=server.url, metrics=["score", "content"]))
        remote = trainer_with(reward, base_state)
        decode, decoded = remote.bundle.decode, []

        def counting_decode(x):
            decoded.append(len(x))
            if len(decoded) == 4:
                last_chunk_decoded.set()
            return decode(x)

        remote.bundle.decode = counting_decode
        remote_row = remote.step(0)
    assert decoded == [2, 2, 2, 2] and ("decoding went on", True) in requests
    assert sorted(r for r in requests if r[0] != "decoding went on") == [(2, ("score",))] * 4  # trainers: score only
    for key in ("reward", "reward_quality", "kept_groups", "loss", "kl"):
        assert remote_row[key] == local_row[key], key  # scores in their rows, though the first chunk answered last
    assert local_row["kept_groups"] > 0  # the rewards told samples apart, so the step trained
    for a, b in zip(remote.bundle.transformer.parameters(), local.bundle.transformer.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = [not torch.equal(p, base_state[n]) for n, p in remote.bundle.state_dict().items() if n in base_state]
    assert any(moved)


def test_in_process_rewards_stay_on_the_callers_thread(base_state):
    trainer = trainer_with(get_reward("quality"), base_state)
    assert trainer.remote_scoring is None and trainer.rollout(0).pending == []


def test_a_failing_server_fails_the_step_with_the_clients_error(base_state):
    def broken(request):
        raise RuntimeError("out of memory")

    with serving(broken) as server:
        settings = RemoteSettings(url=server.url, retries=1, backoff=0.0)
        trainer = trainer_with(get_reward("remote", settings=settings), base_state)
        with pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: HTTP 500 Internal Server Error: "
                                                    r"the reward failed \(RuntimeError"):
            trainer.step(0)

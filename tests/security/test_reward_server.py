"""The adapter in front of Flow-GRPO's reward-server, end to end on 127.0.0.1: flowopd's client -> `flowopd serve
reward-server` -> stand-ins with reward-server's function signatures and answers. The trainers never see pickle; the
adapter reads reward-server's pickle with a plain-data unpickler, so a hostile answer cannot run code."""

import copyreg
import io
import os
import pickle
import pickletools

import numpy as np
import pytest
from PIL import Image
from reward_stubs import reward_server_stand_in, serving

from flowopd.rewards import get_reward
from flowopd.rewards.remote import RemoteRewardError
from flowopd.rewards.reward_server import RewardServerAdapter, RewardServerClient, jpeg, plain_loads
from flowopd.spec import RemoteSettings
from flowopd.world.prompt_sets import FilePrompt

IMAGES = np.stack([np.full((16, 16, 3), value, dtype=np.uint8) for value in (10, 90, 200, 250, 40)])
IMAGES[:, :4] = 128  # not flat: JPEG changes the pixels a little
METADATA = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
            {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]},
            {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
            {"tag": "position", "include": [{"class": "cup", "count": 1}, {"class": "tv", "count": 1,
                                                                           "position": ["left of", 0]}]},
            {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "blue"}]}]
PROMPTS = [FilePrompt(text=f"a photo of thing {i}", task="geneval", kind=m["tag"], metadata=m)
           for i, m in enumerate(METADATA)]


def brightness_after_jpeg(images):
    return np.array([np.asarray(Image.open(io.BytesIO(jpeg(x))).convert("RGB"), dtype=np.float64).mean() / 255
                     for x in images])


def client(adapter, metrics, **settings):
    settings = {"url": adapter.url, "metrics": list(metrics), "retries": 0, "batch_size": 2, **settings}
    return get_reward("remote", settings=RemoteSettings(**settings))


@pytest.fixture
def geneval():
    """(reward-server stand-in, the adapter's server) for GenEval."""
    with reward_server_stand_in("geneval") as upstream, \
            serving(RewardServerAdapter(upstream.url, "geneval", timeout=10)) as adapter:
        yield upstream, adapter


# ---------------------------------------------------------------- the protocols, mapped
def test_geneval_evaluation_gets_the_official_accuracy_and_the_prompt_back(geneval):
    upstream, adapter = geneval
    out = client(adapter, ["score", "strict", "correct"])(IMAGES, PROMPTS)
    expected = brightness_after_jpeg(IMAGES)
    np.testing.assert_array_equal(out["score"], expected)  # reward-server's "scores": the partial credit
    np.testing.assert_array_equal(out["strict"], expected > 0.5)  # its "strict_rewards"
    np.testing.assert_array_equal(out["correct"], expected > 0.25)  # its "rewards": GenEval's accuracy
    assert [len(p["images"]) for p in upstream.payloads] == [2, 2, 1]
    sent = [m for p in upstream.payloads for m in p["meta_datas"]]
    assert sent == [{**m, "prompt": p.text} for m, p in zip(METADATA, PROMPTS)]  # the prompt put back
    assert all(p["only_strict"] is False for p in upstream.payloads) and set(upstream.payloads[0]) == {
        "images", "meta_datas", "only_strict"}


def test_training_asks_for_the_score_alone_and_reward_server_skips_the_official_check(geneval):
    upstream, adapter = geneval
    reward = client(adapter, ["score", "strict", "correct"])
    out = reward(IMAGES, PROMPTS, metrics=("score",))  # what the trainers ask (flowopd.train.rollouts)
    assert set(out) == {"score"} and all(p["only_strict"] is True for p in upstream.payloads)
    np.testing.assert_array_equal(out["score"], brightness_after_jpeg(IMAGES))
    upstream.payloads.clear()
    out = reward(IMAGES, PROMPTS, metrics=("score", "strict"))  # `correct` is never answered under only_strict
    assert set(out) == {"score", "strict"} and all(p["only_strict"] is True for p in upstream.payloads)


def test_deqa_is_reported_on_its_own_1_to_5_scale():
    with reward_server_stand_in("deqa") as upstream, serving(RewardServerAdapter(upstream.url, "deqa")) as adapter:
        out = client(adapter, ["score"])(IMAGES, ["any prompt"] * len(IMAGES))
        assert set(upstream.payloads[0]) == {"images"}
    np.testing.assert_allclose(out["score"], 1 + 4 * brightness_after_jpeg(IMAGES), rtol=1e-15)


@pytest.mark.parametrize(("prompts", "metrics", "match"), [
    (["a photo of a cat"] * 5, ["score"], r"metadata\[0\] lacks GenEval's 'tag' and 'include'"),
    (PROMPTS, ["score", "accuracy"], r"GenEval has no metric 'accuracy' \(it has: score, strict, correct\)"),
])
def test_a_request_geneval_cannot_score_is_the_clients_4xx(geneval, prompts, metrics, match):
    upstream, adapter = geneval
    with pytest.raises(RemoteRewardError, match=r"HTTP 400 Bad Request: " + match):
        client(adapter, metrics, retries=3)(IMAGES, prompts)
    assert upstream.payloads == []  # refused before reward-server saw it


def test_unknown_kind_and_bad_upstream_url_are_refused():
    with pytest.raises(ValueError, match=r"unknown reward-server kind 'clip'; expected one of geneval, deqa"):
        RewardServerAdapter("http://127.0.0.1:1/", "clip")
    with pytest.raises(ValueError, match="url"):
        RewardServerAdapter("file:///etc/passwd", "deqa")


# ---------------------------------------------------------------- a hostile or broken reward-server
class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def extension_pickle() -> bytes:
    """A pickle that names os.system through the copyreg extension registry (opcode EXT1), not by name."""
    module, name = os.system.__module__, os.system.__name__
    copyreg.add_extension(module, name, 0xF1)
    try:
        blob = pickle.dumps({"outputs": [os.system]}, protocol=2)
    finally:
        copyreg.remove_extension(module, name, 0xF1)
    assert "EXT1" in {op.name for op, _, _ in pickletools.genops(blob)}
    return blob


HOSTILE = [
    (pickle.dumps(RunsCode()), r"not a plain-data pickle \(UnpicklingError: refused posix\.system"),
    (pickle.dumps({"outputs": np.ones(5)}), r"not a plain-data pickle \(UnpicklingError: refused numpy"),
    (extension_pickle(), r"not a plain-data pickle \(ValueError: unregistered extension code 241\)"),
    (b"\x80\x05garbage", r"not a plain-data pickle"),
    (b"Traceback (most recent call last): ...", r"not a plain-data pickle"),
    (pickle.dumps([1.0] * 5), r"answer is a list, not a dict"),
    (pickle.dumps({"scores": [1.0] * 5}), r"answer's 'outputs' is not a list of 5 numbers"),
    (pickle.dumps({"outputs": [1.0] * 4}), r"answer's 'outputs' is not a list of 5 numbers"),
    (pickle.dumps({"outputs": ["0.9"] * 5}), r"answer's 'outputs' holds a str, not a number"),
    (pickle.dumps({"outputs": [True] * 5}), r"answer's 'outputs' holds a bool, not a number"),
    (pickle.dumps({"outputs": [float("nan")] * 5}), r"answer's 'outputs' has non-finite values"),
    (pickle.dumps({"outputs": [1.0] * 5}) + b"\x00" * (9 * 2**20), r"over the 8388608-byte cap"),
]


@pytest.mark.parametrize(("reply", "match"), HOSTILE)
def test_a_hostile_answer_is_refused_and_runs_nothing(reply, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with reward_server_stand_in("deqa") as upstream:
        upstream.reply = reply
        upstream_client = RewardServerClient(RemoteSettings(url=upstream.url, retries=0))
        with pytest.raises(RemoteRewardError, match=match):
            upstream_client.numbers(upstream_client.call({"images": []}), "outputs", 5)
        with serving(RewardServerAdapter(upstream.url, "deqa")) as adapter, \
                pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: HTTP 502 Bad Gateway: "
                                                       r"reward server http://127\.0\.0\.1:\d+/: "):
            client(adapter, ["score"], retries=1, backoff=0.0)(IMAGES, ["p"] * 5)  # the trainer's view: retried
    assert not (tmp_path / "PWNED").exists()


def test_the_plain_unpickler_reads_what_reward_server_sends():
    """Its answers are dicts of lists of floats, pickled at the default protocol (4; 5 from Python 3.14): read at
    every protocol; sets and bytes, which need a global before protocol 4 (and are refused there), from 4 on."""
    data = {"scores": [0.5, 1, -2.0], "rewards": (1.0, 0.0), "none": None, "flag": True, "big": 2**80,
            "group_rewards": {"counting": [-10.0, 1.0]}, "text": "ünïcode"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert plain_loads(pickle.dumps(data, protocol=protocol)) == data
    for protocol in (4, 5):
        more = data | {"tags": {"a", "b"}, "raw": b"\x00\xff"}
        assert plain_loads(pickle.dumps(more, protocol=protocol)) == more
    with pytest.raises(pickle.UnpicklingError, match=r"refused builtins\.set"):
        plain_loads(pickle.dumps({1, 2}, protocol=3))


def test_a_registered_extension_code_is_looked_up_and_refused_too():
    blob = extension_pickle()
    copyreg.add_extension(os.system.__module__, "system", 0xF1)
    try:
        with pytest.raises(pickle.UnpicklingError, match=r"refused posix\.system"):
            plain_loads(blob)
    finally:
        copyreg.remove_extension(os.system.__module__, "system", 0xF1)


def test_reward_server_that_dies_mid_batch_is_a_clear_error(geneval):
    upstream, adapter = geneval
    reward = client(adapter, ["score"], retries=1, backoff=0.0)
    answered = []

    def die_after_first(request_):
        answered.append(len(request_.prompts))
        upstream.alive = len(answered) < 2  # the second request finds it dead
        return adapter.scorer_(request_)

    adapter.scorer_, adapter.scorer = adapter.scorer, die_after_first
    with pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: HTTP 502 Bad Gateway: reward server "
                                                r"http://127\.0\.0\.1:\d+/: 1 attempts failed; last: "
                                                r"(RemoteDisconnected|ConnectionResetError|BadStatusLine)"):
        reward(IMAGES, PROMPTS)
    assert answered == [2, 2, 2] and len(upstream.payloads) == 1  # first batch answered, the second twice refused

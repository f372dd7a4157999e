"""GPU-scale rewards on CPU: PickScore with a tiny random CLIP, the remote client against stub servers on
127.0.0.1, the OCR scene reader on rendered signs, and the registry's settings."""

import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from reward_stubs import StubHandler, save_tiny_clip

from flowopd.rewards import get_reward, task_reward
from flowopd.rewards.remote import RemoteRewardError
from flowopd.spec import OCRSettings, PickScoreSettings, RemoteSettings, Task
from flowopd.world import Prompt, WorldConfig
from flowopd.world.prompt_sets import FilePrompt

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (5, 24, 40, 3), dtype=np.uint8)
PROMPTS = [FilePrompt(text=f"prompt number {i}", task="t", metadata={"include": [{}] * i}) for i in range(5)]


# ---------------------------------------------------------------- PickScore
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("pickscore"))


def test_pickscore_is_scaled_clip_cosine(clip_folder):
    reward = get_reward("pickscore", settings=PickScoreSettings(model=str(clip_folder), batch_size=2))
    texts = [p.text for p in PROMPTS]
    score = reward(IMAGES, PROMPTS)["score"]
    assert score.shape == (5,) and score.dtype == np.float64
    # independently: projected pooled embeddings, normalised, times exp(logit_scale)
    model, processor = reward.model, reward.processor
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(x) for x in IMAGES], return_tensors="pt")["pixel_values"]
        tokens = processor(text=texts, padding=True, return_tensors="pt")
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        expected = (model.logit_scale.exp() * cosine).numpy()
    np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reward(IMAGES[:3], texts[:3])["score"], score[:3], rtol=1e-5, atol=1e-5)
    assert np.ptp(score) > 0  # images and prompts reach the model


def test_pickscore_missing_folder_is_named(tmp_path):
    with pytest.raises(OSError, match="pickscore: cannot load CLIP from .*nowhere"):
        get_reward("pickscore", settings=PickScoreSettings(model=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- remote: stub servers


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    httpd.daemon_threads = True
    httpd.mode, httpd.calls, httpd.bodies = "ok", 0, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def remote(server, sleeps=None, **settings):
    settings = {"url": f"http://127.0.0.1:{server.server_address[1]}/score", "metrics": ["score", "strict"],
                "backoff": 0.25, **settings}
    reward = get_reward("remote", settings=RemoteSettings(**settings))
    if sleeps is not None:
        reward.sleep = sleeps.append  # record the backoff instead of waiting
    return reward


def test_remote_success_batches_and_sends_images_prompts_metadata(server):
    out = remote(server, batch_size=2, metrics=["score", "strict", "n_include"])(IMAGES, PROMPTS)
    assert server.calls == 3 and [len(b["images"]) for b in server.bodies] == [2, 2, 1]
    np.testing.assert_allclose(out["score"], IMAGES.reshape(5, -1).mean(1) / 255)  # PNG is lossless
    np.testing.assert_array_equal(out["strict"], [len(p.text) for p in PROMPTS])
    np.testing.assert_array_equal(out["n_include"], np.arange(5))
    assert set(out) == {"score", "strict", "n_include"} and out["score"].dtype == np.float64


def test_remote_retries_a_failing_server_with_backoff(server):
    server.mode, sleeps = "flaky", []
    out = remote(server, sleeps, retries=3)(IMAGES[:2], PROMPTS[:2])
    assert server.calls == 3 and sleeps == [0.25, 0.5]
    np.testing.assert_allclose(out["score"], IMAGES[:2].reshape(2, -1).mean(1) / 255)
    server.calls, sleeps = 0, []
    with pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: HTTP 500"):
        remote(server, sleeps, retries=1)(IMAGES[:2], PROMPTS[:2])
    assert server.calls == 2 and sleeps == [0.25]


def test_remote_times_out_then_fails_clearly(server):
    server.mode, sleeps = "slow", []
    started = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"reward server http://127.0.0.1:\d+/score: 2 attempts failed; "
                                                r"last: timed out after 0.1 s"):
        remote(server, sleeps, timeout=0.1, retries=1)(IMAGES[:1], PROMPTS[:1])
    assert time.perf_counter() - started < 0.45 and server.calls == 2


def test_remote_does_not_retry_client_or_protocol_errors(server):
    server.mode = "bad_request"
    with pytest.raises(RemoteRewardError, match="HTTP 400 Bad Request: .*images missing"):
        remote(server, [], retries=3)(IMAGES[:1], PROMPTS[:1])
    assert server.calls == 1
    server.mode, server.calls = "wrong_keys", 0
    with pytest.raises(RemoteRewardError, match=r"lacks metrics \['strict'\]"):
        remote(server, [], retries=3)(IMAGES[:2], PROMPTS[:2])
    with pytest.raises(RemoteRewardError, match=r"metric 'score' has shape \(1,\), expected \(2,\)"):
        remote(server, [], metrics=["score"])(IMAGES[:2], PROMPTS[:2])
    assert server.calls == 2


def test_remote_unreachable_server(server):
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    sleeps = []
    reward = get_reward("remote", settings=RemoteSettings(url=f"http://127.0.0.1:{port}", retries=2))
    reward.sleep = sleeps.append
    with pytest.raises(RemoteRewardError, match=r"3 attempts failed; last: .*(Connection|refused)"):
        reward(IMAGES[:1], PROMPTS[:1])
    assert sleeps == [1.0, 2.0]


# ---------------------------------------------------------------- OCR scene reader
def sign(text: str, size=(512, 512)) -> np.ndarray:
    image = Image.new("RGB", size, (200, 180, 140))
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 180, size[0] - 40, 330], fill=(250, 245, 230))
    draw.text((70, 230), text, fill=(20, 30, 60), font=ImageFont.load_default(size=40))
    return np.asarray(image)


def test_ocr_scene_reader_scores_sd3_sized_signs():
    reward = get_reward("ocr", WorldConfig(), OCRSettings())
    images = np.stack([sign("Hello World"), sign("Gone Fishing"), np.full((512, 512, 3), 255, np.uint8)])
    prompts = [Prompt(text='A sign that says "hello world"', task="ocr"),
               Prompt(text='a shop sign reading "Gone Fishin" at dusk', task="ocr"),
               Prompt(text='A sign that says "Open"', task="ocr")]
    out = reward(images, prompts)
    np.testing.assert_array_equal(out["score"], [1.0, 1.0, 0.0])  # case ignored; a substring counts as read
    np.testing.assert_array_equal(out["exact"], [1.0, 1.0, 0.0])
    wrong = reward(images[:1], [Prompt(text='A sign that says "Hello Wordle"', task="ocr")])
    assert 0.5 < wrong["score"][0] < 1.0 and wrong["exact"][0] == 0.0
    with pytest.raises(ValueError, match="needs a word or a double-quoted text"):
        reward(images[:1], [Prompt(text="a sign without quotes", task="ocr")])
    with pytest.raises(ValueError, match="tiny reader reads tiny renders .* got 512x512"):  # no silent misuse
        get_reward("ocr")(images[:1], [Prompt(text="x", task="text", word="HELLO")])


# ---------------------------------------------------------------- registry
def test_registry_settings_rules():
    with pytest.raises(ValueError, match="reward 'remote' needs settings"):
        get_reward("remote")
    with pytest.raises(ValueError, match="reward 'objects' takes no settings"):
        get_reward("objects", settings=OCRSettings())
    task = Task.model_validate({"prompts": {"kind": "file", "train": "a.txt", "test": "b.txt"}, "reward": "remote",
                                "remote": {"url": "http://127.0.0.1:1", "metrics": ["score", "strict"]},
                                "metric": "strict"})
    reward = task_reward(task)
    assert reward.name == "remote" and reward.settings.metrics == ("score", "strict")
    assert get_reward("ocr").settings is None  # the tiny reader, as the tiny trainers call it

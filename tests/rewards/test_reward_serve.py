"""`flowopd serve`: an in-process reward behind the remote reward's JSON protocol on 127.0.0.1. `reward: remote`
pointed at it scores bit for bit what the reward scores in process; bad input gets a clear 4xx JSON error."""

import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reward_stubs import save_tiny_clip, serving

from flowopd.cli import main
from flowopd.rewards import get_reward
from flowopd.rewards.adversarial import render_all
from flowopd.rewards.remote import RemoteRewardError, png_base64
from flowopd.rewards.server import InProcessScorer, in_process_scorer
from flowopd.spec import PickScoreSettings, RemoteSettings
from flowopd.spec.choices import REWARD_METRICS
from flowopd.world import WorldConfig, make_prompt_set

WORLD = WorldConfig()
MICRO = Path(__file__).resolve().parents[1] / "data" / "micro.yaml"
TASKS_OF = {"ocr": ("text",), "objects": ("objects",), "quality": ("text", "objects", "quality")}


def remote(server, metrics=("score",), **settings):
    settings = {"url": server.url, "metrics": list(metrics), "retries": 0, **settings}
    return get_reward("remote", settings=RemoteSettings(**settings))


def benchmark(name: str):
    """Prompts of the reward's tasks with images that fit them, fit another prompt, or are noisy."""
    prompts = [p for task in TASKS_OF[name] for p in make_prompt_set(WORLD, task, 8, 0, "test")]
    rng = np.random.default_rng(0)
    images = render_all(WORLD, prompts[1:] + prompts[:1], rng)  # each image drawn for the next prompt ...
    images[::2] = render_all(WORLD, prompts[::2], rng)  # ... but every other one for its own
    noisy = images[::3].astype(int) + rng.integers(-90, 90, images[::3].shape)
    images[::3] = np.clip(noisy, 0, 255).astype(np.uint8)
    return images, prompts


@pytest.mark.parametrize("name", ["ocr", "objects", "quality"])
def test_a_served_reward_scores_bit_for_bit_as_in_process(name):
    images, prompts = benchmark(name)
    local = get_reward(name, WORLD)(images, prompts)
    with serving(in_process_scorer(name)) as server:
        served = remote(server, REWARD_METRICS[name], batch_size=5)(images, prompts)
    for metric in REWARD_METRICS[name]:
        np.testing.assert_array_equal(served[metric], local[metric], err_msg=metric)
        assert served[metric].dtype == np.float64
    assert len(set(local["score"].tolist())) > 1  # the scores tell the images apart: the comparison means something


def test_pickscore_serves_file_prompts_at_any_size(tmp_path):
    """A reward with settings scores any image size; a prompt outside the world's grammar keeps its text."""
    reward = get_reward("pickscore", settings=PickScoreSettings(model=str(save_tiny_clip(tmp_path / "clip"))))
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    prompts = ["a photo of a cat", "a red bus", 'a sign that says "hello"']
    with serving(InProcessScorer(reward, WORLD, canvas=None)) as server:
        served = remote(server)(images, prompts)
    np.testing.assert_array_equal(served["score"], reward(images, prompts)["score"])


def test_the_served_reward_comes_from_the_spec_and_task():
    assert in_process_scorer("objects", str(MICRO), "objects").canvas == WORLD.canvas
    for args, match in [
        (("remote",), r"cannot serve 'remote': expected one of objects, ocr, pickscore, quality, or reward-server"),
        (("pickscore",), r"reward 'pickscore' needs settings"),
        (("ocr", None, "text"), r"--task needs --spec"),
        (("ocr", str(MICRO), "objects"), r"task 'objects' has reward 'objects', not 'ocr'"),
        (("ocr", str(MICRO), "nope"), r"no task 'nope' \(it has: objects, quality, text\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            in_process_scorer(*args)


# ---------------------------------------------------------------- bad input: a clear 4xx JSON error
def png(image) -> str:
    return png_base64(np.asarray(image, dtype=np.uint8))


def jpeg_base64(image) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


CANVAS = np.zeros((32, 32, 3), dtype=np.uint8)
NOISE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
CUT_PNG = base64.b64encode(base64.b64decode(png(NOISE))[:1500]).decode()  # its pixel data cut short
OBJECTS = [p.text for p in make_prompt_set(WORLD, "objects", 2, 0, "test")]


def request(**fields) -> bytes:
    return json.dumps({"images": [png(CANVAS)] * 2, "prompts": OBJECTS, **fields}).encode()


def post(server, body: bytes, headers=None, method="POST"):
    """-> (status, content type, the answer's JSON)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, "/", body, headers)
        response = conn.getresponse()
        return response.status, response.headers.get_content_type(), json.loads(response.read())
    finally:
        conn.close()


BAD_REQUESTS = [
    (b"{not json", 400, r"request is not valid JSON \(JSONDecodeError"),
    (b"[1, 2]", 400, r"request is a list, not a JSON object"),
    (b'{"images": [], "images": []}', 400, r"duplicate keys"),
    (request(extra=1), 400, r"request has unknown keys \['extra'\]"),
    (json.dumps({"images": [png(CANVAS)]}).encode(), 400, r"request lacks \['prompts'\]"),
    (request(prompts=OBJECTS[:1]), 400, r"2 images but 1 prompts"),
    (request(prompts=[1, 2]), 400, r"'prompts' must be a list of strings"),
    (request(metadata=[{}]), 400, r"2 images but 1 metadata objects"),
    (request(images=[]), 400, r"'images' must be a non-empty list"),
    (request(images=["%%%", png(CANVAS)]), 400, r"images\[0\] is not base64"),
    (request(images=[png(CANVAS), 7]), 400, r"images\[1\] is a int, not a base64 PNG string"),
    (request(images=[jpeg_base64(CANVAS)] * 2), 400, r"images\[0\] is not a PNG image"),
    (request(images=[png(CANVAS), CUT_PNG]), 400, r"images\[1\] is a broken PNG"),
    (request(images=[png(np.zeros((1, 5000, 3)))] * 2), 400, r"images\[0\] is 5000x1, over 4096 pixels a side"),
    (request(images=[png(CANVAS), png(np.zeros((16, 16, 3)))]), 400,
     r"images\[1\] is 16x16, images\[0\] 32x32: a batch has one size"),
    (request(images=[png(np.zeros((64, 48, 3)))] * 2), 400,
     r"images are 48x64; reward 'objects' scores the tiny world's 32x32 canvas"),
    (request(metrics=["score", "nope"]), 400, r"reward 'objects' has no metric 'nope' \(it has: score, strict\)"),
    (request(prompts=['a sign that says "AC"'] * 2), 400,
     r"reward 'objects' refused the batch: the objects reward scores prompts with objects only"),
]


@pytest.fixture(scope="module")
def objects_server():
    with serving(in_process_scorer("objects"), max_request_mb=0.25) as server:
        yield server


@pytest.mark.parametrize(("body", "status", "match"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_json_error(objects_server, body, status, match):
    got, kind, answer = post(objects_server, body)
    assert (got, kind) == (status, "application/json") and set(answer) == {"error"}
    assert re.search(match, answer["error"]), answer["error"]


def test_transport_rules_are_4xx_too(objects_server):
    cases = [
        (request(), {"Content-Type": "text/plain"}, "POST", 415, r"request is text/plain, not application/json"),
        (b"x" * 300_000, {}, "POST", 413, r"request of 300000 bytes is over the 262144-byte cap"),
        (iter([request()]), {"Transfer-Encoding": "chunked"}, "POST", 411, r"needs a Content-Length"),
        (None, {}, "GET", 405, r"POST a scoring request"),
    ]
    for body, headers, method, status, match in cases:
        got, _, answer = post(objects_server, body, headers, method)
        assert got == status and re.search(match, answer["error"]), (status, answer)
    got, _, answer = post(objects_server, request(metrics=["strict"]))  # the server still answers afterwards
    assert got == 200 and set(answer) == {"strict"}


def test_the_client_gets_the_servers_reason_and_does_not_retry_a_4xx():
    calls = []

    def counted(request_):
        calls.append(len(request_.prompts))
        return scorer(request_)

    scorer, prompts = in_process_scorer("objects"), make_prompt_set(WORLD, "objects", 2, 0, "test")
    with serving(counted) as server, \
            pytest.raises(RemoteRewardError, match=r"HTTP 400 Bad Request: images are 40x40; reward 'objects'"):
        remote(server, retries=3)(np.zeros((2, 40, 40, 3), dtype=np.uint8), prompts)
    assert calls == [2]


def test_a_reward_that_breaks_is_a_500_naming_its_type_only():
    def broken(request_):
        raise RuntimeError("/secret/path/model.bin is corrupt")

    with serving(broken) as server:
        got, _, answer = post(server, request())
        assert got == 500 and answer == {"error": "the reward failed (RuntimeError; traceback on the server)"}
        reward = remote(server, retries=1, backoff=0.0)
        with pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: HTTP 500 Internal Server Error: "
                                                    r"the reward failed \(RuntimeError") as caught:
            reward(np.zeros((1, 32, 32, 3), dtype=np.uint8), OBJECTS[:1])
    assert "secret" not in str(caught.value)


# ---------------------------------------------------------------- the command
def test_flowopd_serve_runs_a_reward_server_on_127_0_0_1():
    images, prompts = benchmark("objects")
    command = [sys.executable, "-m", "flowopd", "serve", "objects", "--port", "0", "--quiet"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}) as process:
        try:
            line = process.stderr.readline()
            url = re.fullmatch(r"serving reward 'objects' on (http://127\.0\.0\.1:\d+/)\n", line)
            assert url, line
            settings = RemoteSettings(url=url[1], metrics=["score", "strict"], retries=0)
            served = get_reward("remote", settings=settings)(images, prompts)
        finally:
            process.terminate()
    local = get_reward("objects", WORLD)(images, prompts)
    for metric in ("score", "strict"):
        np.testing.assert_array_equal(served[metric], local[metric])


@pytest.mark.parametrize(("argv", "match"), [
    (["remote"], r"flowopd serve: cannot serve 'remote'"),
    (["reward-server"], r"reward-server takes --upstream URL and --kind geneval\|deqa"),
    (["objects", "--kind", "deqa"], r"--upstream and --kind are for reward-server"),
    (["objects", "--spec", "nowhere.yaml"], r"nowhere\.yaml"),
])
def test_flowopd_serve_refuses_bad_arguments_in_one_line(argv, match, capsys):
    assert main(["serve", *argv, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err) and len(err.strip().splitlines()) == 1, err

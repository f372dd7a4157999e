"""A reward over HTTP: the server side of the remote reward's JSON protocol (rewards/remote.py), run by
`flowopd serve` (rewards/serve_cli.py).

A reward of the registry (ocr, objects, quality, pickscore) served here scores, through `reward: remote`, what it
scores in process, bit for bit (PNG is lossless and a JSON float round-trips). Its world comes from a spec (default:
the default tiny world), its settings from one of the spec's tasks (pickscore and the scene OCR need them). Prompts
arrive as text: a sentence of the world's grammar becomes that Prompt (its word, its objects), any other text a
FilePrompt with the request's metadata. The same server fronts Flow-GRPO's reward-server (rewards/reward_server.py).

The server does not trust its clients either: a request over --max-request-mb is refused unread (413), one without a
Content-Length too (411), and anything else outside the protocol is a 4xx JSON {"error": ...} naming what is wrong:
not JSON, a missing or unknown key, lengths that differ, an image that is not a PNG, over MAX_SIDE pixels a side, of
another size than the batch's first or than the tiny world's canvas, a metric the reward does not have. A reward that
refuses its input (ValueError) is a 400 with its message; any other failure a 500 naming the exception's type, the
traceback on the server's stderr. One request is scored at a time (one model, one device). It listens on 127.0.0.1
unless told otherwise, without authentication (docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from flowopd.rewards.remote import RemoteRewardError, short, unique_keys

MAX_SIDE = 4096  # pixels a side: PNG compresses a huge blank image into a small request
MAX_REQUEST_MB = 256.0  # 64 base64 PNGs at 512 px take about 40 MB
REQUEST_KEYS = ("images", "prompts", "metadata", "metrics")


class BadRequest(ValueError):
    """A request outside the protocol: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    images: np.ndarray  # (N, H, W, 3) uint8
    prompts: list[str]
    metadata: list[dict]
    metrics: tuple[str, ...] | None  # None: every metric the server has


# ---------------------------------------------------------------- the protocol
def decode_image(text, i: int) -> np.ndarray:
    """images[i]: a base64 PNG -> (H, W, 3) uint8; its size is checked before its pixels are decoded."""
    from PIL import Image

    if not isinstance(text, str):
        raise BadRequest(f"images[{i}] is a {type(text).__name__}, not a base64 PNG string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"images[{i}] is not base64") from None
    broken = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])  # reads the header only
    except broken as err:
        raise BadRequest(f"images[{i}] is not a PNG image ({type(err).__name__})") from None
    if max(image.size) > MAX_SIDE:
        raise BadRequest(f"images[{i}] is {image.width}x{image.height}, over {MAX_SIDE} pixels a side")
    try:
        return np.asarray(image.convert("RGB"))
    except broken as err:
        raise BadRequest(f"images[{i}] is a broken PNG ({type(err).__name__})") from None


def strings(data: dict, key: str) -> list[str]:
    values = data[key]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"{key!r} must be a list of strings")
    return values


def parse_request(body: bytes) -> ScoreRequest:
    """A request body -> ScoreRequest, or BadRequest naming the first thing outside the protocol."""
    try:
        data = json.loads(body, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"request is not valid JSON ({type(err).__name__}: {short(err)})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request is a {type(data).__name__}, not a JSON object")
    unknown = sorted(set(data) - set(REQUEST_KEYS))
    missing = [key for key in ("images", "prompts") if key not in data]
    if unknown or missing:
        raise BadRequest(f"request has unknown keys {[short(k, 40) for k in unknown]}" if unknown
                         else f"request lacks {missing}")
    images, prompts = data["images"], strings(data, "prompts")
    if not isinstance(images, list) or not images:
        raise BadRequest("'images' must be a non-empty list of base64 PNGs")
    if len(prompts) != len(images):
        raise BadRequest(f"{len(images)} images but {len(prompts)} prompts")
    metadata = data.get("metadata", [{} for _ in images])
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest("'metadata' must be a list of objects")
    if len(metadata) != len(images):
        raise BadRequest(f"{len(images)} images but {len(metadata)} metadata objects")
    metrics = tuple(strings(data, "metrics")) if "metrics" in data else None
    decoded = [decode_image(text, i) for i, text in enumerate(images)]
    for i, image in enumerate(decoded):
        if image.shape != decoded[0].shape:
            raise BadRequest(f"images[{i}] is {image.shape[1]}x{image.shape[0]}, images[0] "
                             f"{decoded[0].shape[1]}x{decoded[0].shape[0]}: a batch has one size")
    return ScoreRequest(np.stack(decoded), prompts, metadata, metrics)


def chosen_metrics(scores: dict, wanted: tuple[str, ...] | None, what: str) -> dict:
    """The metrics a request asks for (all when it names none), or BadRequest naming those `what` lacks."""
    unknown = [m for m in wanted or () if m not in scores]
    if unknown:
        raise BadRequest(f"{what} has no metric {', '.join(map(repr, unknown))} (it has: {', '.join(scores)})")
    return {m: scores[m] for m in wanted or scores}


def answer_json(scores: dict, n: int) -> bytes:
    """{metric: (n,) numbers} -> the protocol's answer; a wrong length or a non-finite score is the server's bug."""
    answer = {}
    for metric, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,) or not np.isfinite(values).all():
            raise RuntimeError(f"metric {metric!r}: {values.shape} values, not {n} finite numbers")
        answer[metric] = values.tolist()
    return json.dumps(answer).encode()


# ---------------------------------------------------------------- the HTTP server
class ProtocolHandler(BaseHTTPRequestHandler):
    """POST any path: a ScoreRequest in, the scorer's metrics out."""

    protocol_version = "HTTP/1.1"
    server_version = "flowopd-serve"
    timeout = 300  # seconds a client may take to send its request before its thread is freed

    def do_POST(self):
        try:
            request = parse_request(self.read_body())
            answer, status = answer_json(self.server.scorer(request), len(request.prompts)), 200
        except BadRequest as err:
            answer, status = self.error(err), err.status
        except RemoteRewardError as err:  # an adapter's upstream failed: the client may retry
            answer, status = self.error(err), 502
        except Exception as err:  # noqa: BLE001 (whatever breaks, the client gets an answer, the log the traceback)
            traceback.print_exc()
            answer, status = self.error(f"the reward failed ({type(err).__name__}; traceback on the server)"), 500
        self.reply(status, answer)

    def do_GET(self):
        self.close_connection = True
        self.reply(405, self.error("POST a scoring request (docs/gpu.md#reward-servers)"))

    def read_body(self) -> bytes:
        length, cap = self.headers.get("Content-Length", ""), self.server.max_request_bytes
        if self.headers.get("Transfer-Encoding") or not length.strip().isdigit():
            self.close_connection = True
            raise BadRequest("a request needs a Content-Length (no chunked bodies)", 411)
        if int(length) > cap:
            self.close_connection = True  # its body is never read
            raise BadRequest(f"request of {int(length)} bytes is over the {cap}-byte cap", 413)
        body = self.rfile.read(int(length))
        if self.headers.get_content_type() != "application/json":
            raise BadRequest(f"request is {self.headers.get_content_type()}, not application/json", 415)
        return body

    @staticmethod
    def error(err) -> bytes:
        return json.dumps({"error": short(err, 300)}).encode()

    def reply(self, status: int, body: bytes):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client hung up (its deadline passed): nothing to tell it
            self.close_connection = True

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


class RewardHTTPServer(ThreadingHTTPServer):
    """Serves `scorer(ScoreRequest) -> {metric: (N,) numbers}` over the protocol, one thread per connection."""

    daemon_threads = True

    def __init__(self, address, scorer, max_request_mb: float = MAX_REQUEST_MB, quiet: bool = False):
        super().__init__(address, ProtocolHandler)
        self.scorer, self.max_request_bytes, self.quiet = scorer, int(max_request_mb * 2**20), quiet

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


# ---------------------------------------------------------------- an in-process reward behind the protocol
class InProcessScorer:
    """A reward of the registry: prompts rebuilt from their text, the tiny world's canvas checked, one call at a time.

    canvas: the image size the reward scores (the tiny world's rewards), None: any size."""

    def __init__(self, reward, world, canvas: int | None):
        from flowopd.world import TASKS
        from flowopd.world.grammar import all_prompts

        self.reward, self.canvas, self.lock = reward, canvas, threading.Lock()
        self.grammar = {p.text: p for task in TASKS for family in all_prompts(world, task).values() for p in family}

    def prompt(self, text: str, metadata: dict):
        from flowopd.world.prompt_sets import FilePrompt

        known = self.grammar.get(text)
        return known if known is not None else FilePrompt(text=text, task="", kind=str(metadata.get("tag", "")),
                                                          metadata=metadata)

    def __call__(self, request: ScoreRequest) -> dict:
        height, width = request.images.shape[1:3]
        if self.canvas is not None and (height, width) != (self.canvas, self.canvas):
            raise BadRequest(f"images are {width}x{height}; reward {self.reward.name!r} scores the tiny world's "
                             f"{self.canvas}x{self.canvas} canvas")
        prompts = [self.prompt(t, m) for t, m in zip(request.prompts, request.metadata)]
        try:
            with self.lock:
                scores = self.reward(request.images, prompts)
        except ValueError as err:  # the reward's own refusal of its input (a prompt without a word, ...)
            raise BadRequest(f"reward {self.reward.name!r} refused the batch: {short(err, 200)}") from None
        return chosen_metrics(scores, request.metrics, f"reward {self.reward.name!r}")


def in_process_scorer(name: str, spec_path: str | None = None, task: str | None = None) -> InProcessScorer:
    """The registry's reward `name` in the world of the spec at `spec_path` (None: the default tiny world), with the
    settings of that spec's `task` (its reward must be `name`)."""
    from flowopd.rewards import REWARDS, get_reward
    from flowopd.spec.validation import load_spec
    from flowopd.world import WorldConfig
    from flowopd.world.prompt_sets import world_config

    if name not in REWARDS or name == "remote":
        served = ", ".join(sorted(set(REWARDS) - {"remote"}))
        raise ValueError(f"cannot serve {name!r}: expected one of {served}, or reward-server")
    if task is not None and spec_path is None:
        raise ValueError("--task needs --spec (the task is looked up in it)")
    spec = load_spec(spec_path) if spec_path is not None else None
    world = world_config(spec) if spec is not None else WorldConfig()
    settings = None
    if task is not None:
        if task not in spec.tasks:
            raise ValueError(f"{spec_path}: no task {task!r} (it has: {', '.join(spec.tasks)})")
        if spec.tasks[task].reward != name:
            raise ValueError(f"{spec_path}: task {task!r} has reward {spec.tasks[task].reward!r}, not {name!r}")
        settings = spec.tasks[task].reward_settings()
    reward = get_reward(name, world, settings)
    return InProcessScorer(reward, world, canvas=world.canvas if settings is None else None)

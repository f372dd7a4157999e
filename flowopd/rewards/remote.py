"""Remote reward: an HTTP client for reward servers that run elsewhere (GenEval's detector, DeQA's VLM, ...).

Flow-GRPO sends pickled JPEG bytes to such servers; pickle from the network can run code, so this client speaks
plain JSON instead. A server (or a thin adapter in front of Flow-GRPO's reward-server) must answer:

    POST <url>   Content-Type: application/json
    {"images":   ["<base64 PNG>", ...],           # N lossless RGB images
     "prompts":  ["a photo of a cat", ...],       # N prompt texts
     "metadata": [{"tag": "single_object", ...}],  # N objects: the prompt files' metadata (GenEval's include ...)
     "metrics":  ["score", "strict"]}             # the keys wanted: a server may skip the work of the others
    -> 200 application/json {"score": [N numbers], "strict": [N numbers], ...}   # every key of "metrics"

The trainers want "score" alone; the evaluation every key of `remote.metrics` (GenEval behind Flow-GRPO's
reward-server computes its official accuracy, `correct`, only then: flowopd/rewards/reward_server.py).
`flowopd serve` (flowopd/rewards/server.py) is the server side of this protocol.

Each batch of `batch_size` images is one request. The client does not trust the server:
- one deadline of `timeout` seconds covers a whole request (connect, TLS, send, read), however slowly the server
  trickles;
- redirects are never followed (a POST's images would be dropped or sent elsewhere): a 3xx is an error;
- an answer over MAX_ANSWER_BYTES is refused (Content-Length first, else the read stops at the cap);
- scores are strict: a JSON list of exactly N finite numbers per metric (not strings, booleans or null), no
  duplicate keys.
A request that fails in transit (connection refused or reset, deadline passed, HTTP 5xx or 429) is retried `retries`
times, waiting `backoff` seconds and doubling the wait each time, so a batch takes at most
(retries + 1) * timeout + backoff * (2**retries - 1) seconds. Every failure is a RemoteRewardError naming the server,
the status and what was wrong (never the answer's body); a 3xx/4xx or a reply that breaks the protocol is not
retried (sending it again cannot help). Stdlib only (http.client: no redirects, no proxies).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import ssl
import threading
import time
import urllib.parse

import numpy as np

RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_ANSWER_BYTES = 8 * 2**20  # a batch's scores take a few KB; anything near this is not an answer
ERROR_BYTES = 4096  # read of a retried answer, for its `error`


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, or answered outside the protocol."""


class _Transient(Exception):
    """A failure in transit, worth another attempt."""


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_base64(text: str) -> np.ndarray:
    """Inverse of png_base64 (what a server does with each image)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def short(text, limit: int = 80) -> str:
    """Server-chosen text for an error message: printable characters only (no terminal control codes), cut."""
    text = "".join(c if c.isprintable() else "?" for c in str(text)[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def watchdog(sock: socket.socket, seconds: float):
    """Shut the socket down after `seconds`: a socket's own timeout restarts with every byte, so a server that
    trickles one byte at a time would never meet it."""

    def hang_up():
        try:
            twin.shutdown(socket.SHUT_RDWR)  # wakes a blocked send, recv or handshake
        except OSError:
            pass

    twin = sock.dup()  # the same connection, still reachable once TLS has wrapped `sock`
    timer = threading.Timer(max(seconds, 0.0), hang_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        twin.close()


def unique_keys(pairs: list[tuple]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys in an object")
    return dict(pairs)


class GuardedClient:
    """POSTs to a server the project does not trust (module docstring): one deadline per attempt, retries, no
    redirects, a capped answer. settings: url, timeout, retries, backoff (the spec's RemoteSettings)."""

    max_answer_bytes = MAX_ANSWER_BYTES
    request_type = "application/json"
    answer_type: str | None = "application/json"  # None: any (a server that labels its bytes wrongly)

    def __init__(self, settings, sleep=time.sleep):
        self.settings = settings
        self.sleep = sleep  # injectable so tests need not wait
        parts = urllib.parse.urlsplit(settings.url)
        self.where = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no credentials in errors
        try:
            self.host, self.port = parts.hostname, parts.port
        except ValueError as err:
            raise RemoteRewardError(f"reward server {self.where}: bad url ({err})") from None
        if parts.scheme not in ("http", "https") or not self.host:
            raise RemoteRewardError(f"reward server {self.where}: url must be http(s)://host[:port]/path")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None  # verifies certificates
        self.port = self.port or (443 if self.tls else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def fail(self, what: str) -> RemoteRewardError:
        return RemoteRewardError(f"reward server {self.where}: {what}")

    # -- transport -------------------------------------------------------------------------------------------
    def _post(self, body: bytes) -> bytes:
        s = self.settings
        attempts, wait = s.retries + 1, s.backoff
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(body)
            except _Transient as err:
                error = str(err)
            if attempt < attempts:
                self.sleep(wait)
                wait *= 2
        raise self.fail(f"{attempts} attempts failed; last: {error}")

    def _attempt(self, body: bytes) -> bytes:
        """One POST under one deadline of `timeout` seconds for connect, TLS handshake, send and read together."""
        timeout = self.settings.timeout
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            with socket.create_connection((self.host, self.port), timeout) as sock, \
                    watchdog(sock, started + timeout - time.monotonic()):
                conn.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock
                conn.request("POST", self.path, body, {"Content-Type": self.request_type,
                                                       "Accept": self.answer_type or "*/*", "Connection": "close"})
                with conn.getresponse() as response:
                    answer = self._read(response)
                if time.monotonic() - started >= timeout:  # the watchdog hung up: a body read to its end may be cut
                    raise TimeoutError
        except (OSError, http.client.HTTPException, RemoteRewardError) as err:
            if isinstance(err, TimeoutError) or time.monotonic() - started >= timeout:  # headers may be cut too
                raise _Transient(f"timed out after {timeout:g} s") from None
            if isinstance(err, RemoteRewardError):
                raise
            raise _Transient(f"{type(err).__name__}: {short(err)}") from None
        finally:
            conn.close()
        return answer

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        status = f"HTTP {response.status} {short(response.reason, 40)}"
        if 300 <= response.status < 400:
            location = response.getheader("Location", "")
            raise self.fail(f"{status} to '{short(location)}' refused: a POST is never redirected")
        if response.status in RETRY_STATUS:  # the `error` of a short JSON answer says why (an adapter's upstream)
            kind = response.headers.get_content_type()
            detail = self._detail(response.read(ERROR_BYTES + 1), kind) if kind == "application/json" else ""
            raise _Transient(status + (detail if detail.startswith(":") else ""))
        length, cap = response.getheader("Content-Length", ""), self.max_answer_bytes
        if length.strip().isdigit() and int(length) > cap:
            raise self.fail(f"{status}: answer of {int(length)} bytes is over the {cap}-byte cap")
        answer = response.read(cap + 1)
        if len(answer) > cap:
            raise self.fail(f"{status}: answer is over the {cap}-byte cap")
        kind = response.headers.get_content_type()
        if response.status != 200:
            raise self.fail(f"{status}{self._detail(answer, kind)}")
        if self.answer_type and kind != self.answer_type:
            raise self.fail(f"{status}: answer is {kind}, not {self.answer_type}")
        return answer

    @staticmethod
    def _detail(answer: bytes, kind: str) -> str:
        """The `error` a JSON error reply gives, shortened; for anything else (an HTML page) only its size."""
        try:
            data = json.loads(answer) if kind == "application/json" else None
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return f": {short(data['error'], 160)}"
        return f" ({kind}, {len(answer)} bytes)"


class RemoteReward(GuardedClient):
    """reward(images (N,H,W,3) uint8, prompts) -> {metric: (N,) float64} for every metric of settings.metrics.

    settings: the spec's RemoteSettings (url, metrics, timeout, retries, backoff, batch_size).
    """

    name = "remote"
    waits_on_network = True  # a trainer may score with it on a thread while it decodes (flowopd.train.rollouts)

    def __call__(self, images: np.ndarray, prompts, metrics=None) -> dict[str, np.ndarray]:
        """metrics: the keys to ask for (None: settings.metrics); the trainers ask for ("score",)."""
        images = np.asarray(images)
        if len(images) != len(prompts):
            raise ValueError(f"remote reward: {len(images)} images but {len(prompts)} prompts")
        metrics = tuple(self.settings.metrics if metrics is None else metrics)
        out = {key: [] for key in metrics}
        step = self.settings.batch_size
        for start in range(0, len(images), step):
            chunk = prompts[start : start + step]
            payload = {
                "images": [png_base64(x) for x in images[start : start + step]],
                "prompts": [p if isinstance(p, str) else p.text for p in chunk],
                "metadata": [{} if isinstance(p, str) else dict(getattr(p, "metadata", {}) or {}) for p in chunk],
                "metrics": list(metrics),
            }
            answer = self._post(json.dumps(payload).encode())
            for key, values in self._check(answer, len(chunk), metrics).items():
                out[key].append(values)
        return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in out.items()}

    def _check(self, answer: bytes, n: int, metrics: tuple[str, ...]) -> dict[str, np.ndarray]:
        try:  # JSON integers become floats (huge ones inf, caught below); strings and booleans stay what they are
            data = json.loads(answer, parse_int=float, object_pairs_hook=unique_keys)
        except (ValueError, RecursionError) as err:
            raise self.fail(f"answer is not valid JSON ({type(err).__name__}: {short(err)})") from None
        if not isinstance(data, dict):
            raise self.fail(f"answer is a {type(data).__name__}, not a JSON object")
        missing = [k for k in metrics if k not in data]
        if missing:
            raise self.fail(f"answer lacks metrics {missing} (has {len(data)} keys)")
        out = {}
        for key in metrics:
            values = data[key]
            if not isinstance(values, list):
                raise self.fail(f"metric {key!r} is a {type(values).__name__}, not a list of numbers")
            if len(values) != n:
                raise self.fail(f"metric {key!r} has shape ({len(values)},), expected ({n},)")
            wrong = [v for v in values if type(v) is not float]
            if wrong:
                raise self.fail(f"metric {key!r} holds a {type(wrong[0]).__name__}, not a number")
            values = np.asarray(values, dtype=np.float64)
            if not np.isfinite(values).all():
                raise self.fail(f"metric {key!r} has non-finite values")
            out[key] = values
        return out

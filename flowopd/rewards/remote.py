"""Remote reward: an HTTP client for reward servers that run elsewhere (GenEval's detector, DeQA's VLM, ...).

Flow-GRPO sends pickled JPEG bytes to such servers; pickle from the network can run code, so this client speaks
plain JSON instead. A server (or a thin adapter in front of Flow-GRPO's reward-server) must answer:

    POST <url>   Content-Type: application/json
    {"images":   ["<base64 PNG>", ...],           # N lossless RGB images
     "prompts":  ["a photo of a cat", ...],       # N prompt texts
     "metadata": [{"tag": "single_object", ...}]}  # N objects: the prompt files' metadata (GenEval's include ...)
    -> 200 {"score": [N numbers], "strict": [N numbers], ...}   # every key of the task's `remote.metrics`

Each batch of `batch_size` images is one request. A request that fails (connection refused or reset, no answer
within `timeout` seconds, HTTP 5xx or 429) is retried `retries` times, waiting `backoff` seconds and doubling the
wait each time; after the last attempt a RemoteRewardError names the server and the last error. A 4xx answer or a
reply that breaks the protocol is not retried (sending it again cannot help). Stdlib only (urllib).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np

RETRY_STATUS = (429, 500, 502, 503, 504)


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, or answered outside the protocol."""


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_base64(text: str) -> np.ndarray:
    """Inverse of png_base64 (what a server does with each image)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


class RemoteReward:
    """reward(images (N,H,W,3) uint8, prompts) -> {metric: (N,) float64} for every metric of settings.metrics.

    settings: the spec's RemoteSettings (url, metrics, timeout, retries, backoff, batch_size).
    """

    name = "remote"

    def __init__(self, settings, sleep=time.sleep):
        self.settings = settings
        self.sleep = sleep  # injectable so tests need not wait

    def __call__(self, images: np.ndarray, prompts) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if len(images) != len(prompts):
            raise ValueError(f"remote reward: {len(images)} images but {len(prompts)} prompts")
        out = {key: [] for key in self.settings.metrics}
        step = self.settings.batch_size
        for start in range(0, len(images), step):
            chunk = prompts[start : start + step]
            payload = {
                "images": [png_base64(x) for x in images[start : start + step]],
                "prompts": [p if isinstance(p, str) else p.text for p in chunk],
                "metadata": [{} if isinstance(p, str) else dict(getattr(p, "metadata", {}) or {}) for p in chunk],
            }
            answer = self._post(json.dumps(payload).encode())
            for key, values in self._check(answer, len(chunk)).items():
                out[key].append(values)
        return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in out.items()}

    # -- transport -------------------------------------------------------------------------------------------
    def _post(self, body: bytes) -> bytes:
        s = self.settings
        attempts, wait = s.retries + 1, s.backoff
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(s.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=s.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS:
                    detail = err.read()[:200].decode("utf-8", "replace")
                    raise RemoteRewardError(f"reward server {s.url}: HTTP {err.code} {err.reason}: {detail}") from None
                error = f"HTTP {err.code} {err.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                error = f"timed out after {s.timeout:g} s" if isinstance(reason, TimeoutError) else repr(reason)
            if attempt < attempts:
                self.sleep(wait)
                wait *= 2
        raise RemoteRewardError(f"reward server {s.url}: {attempts} attempts failed; last: {error}")

    def _check(self, answer: bytes, n: int) -> dict[str, np.ndarray]:
        url = self.settings.url
        try:
            data = json.loads(answer)
        except ValueError:
            raise RemoteRewardError(f"reward server {url}: answer is not JSON: {answer[:80]!r}") from None
        if not isinstance(data, dict):
            raise RemoteRewardError(f"reward server {url}: answer is a {type(data).__name__}, not a JSON object")
        missing = [k for k in self.settings.metrics if k not in data]
        if missing:
            raise RemoteRewardError(f"reward server {url}: answer lacks metrics {missing} (has {sorted(data)})")
        out = {}
        for key in self.settings.metrics:
            try:
                values = np.asarray(data[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise RemoteRewardError(f"reward server {url}: metric {key!r} is not a list of numbers") from None
            if values.shape != (n,):
                raise RemoteRewardError(f"reward server {url}: metric {key!r} has shape {values.shape}, "
                                        f"expected ({n},)")
            if not np.isfinite(values).all():
                raise RemoteRewardError(f"reward server {url}: metric {key!r} has non-finite values")
            out[key] = values
        return out

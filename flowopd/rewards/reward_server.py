"""The adapter in front of Flow-GRPO's reward-server (github.com/yifan123/reward-server): GenEval and DeQA.

    gunicorn "app_geneval:create_app()"       # reward-server, on 127.0.0.1:18085 (18086: app_deqa)
    flowopd serve reward-server --upstream http://127.0.0.1:18085 --kind geneval --port 18185
    flowopd serve reward-server --upstream http://127.0.0.1:18086 --kind deqa --port 18186

It speaks the project's JSON protocol (rewards/remote.py) to the trainers and the evaluation, and reward-server's
to reward-server: a pickled dict holding JPEG bytes (PIL's default quality, as Flow-GRPO's client) POSTed to its
root, a pickled dict back. Field by field:
- geneval: sends {"images", "meta_datas", "only_strict"}; meta_datas are the prompt file's records (tag, include,
  exclude) with the prompt put back as "prompt" (the data stage keeps it as the prompt's text; reward-server reads
  it); only_strict when the request does not ask for `correct` (the trainers ask for `score` alone, as Flow-GRPO
  trains with only_strict=True and evaluates with False). Answers
      score   <- "scores"          partial credit per requirement: the training reward
      strict  <- "strict_rewards"  every requirement met with exact counts (reward-server's strict_correct)
      correct <- "rewards"         GenEval's official accuracy (counts at least, colours, positions): the headline;
                                   never answered under only_strict (reward-server then reports 0 for every image)
- deqa: sends {"images"}; answers score <- "outputs" x 5: reward-server divides DeQA's 1-5 score by 5, the
  project reports it on its own scale as the paper does (specs/sd3: normaliser 5).

Why a proxy rather than a client-side protocol option: the processes that hold the weights, the DVC cache and the
ledger never handle pickle; they speak JSON through the hardened client. This adapter only *sends* pickle (plain
data it built itself) and reads reward-server's answer, from at most 8 MiB, with PlainUnpickler: plain containers,
strings and numbers only, no class or function, so an answer cannot run code; every field is then checked to be N
finite numbers. Run it beside reward-server (its machine, its user), so it trusts nothing reward-server's user
could not already do.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np

from flowopd.rewards.remote import GuardedClient, short
from flowopd.rewards.server import BadRequest, ScoreRequest, chosen_metrics
from flowopd.spec import RemoteSettings

KINDS = ("geneval", "deqa")
GENEVAL_METRICS = ("score", "strict", "correct")
DEQA_SCALE = 5.0  # reward-server's DeQA answer is the 1-5 score divided by this
MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError, OverflowError,
             MemoryError, RecursionError)  # what unpickling a malformed or refused stream raises


class PlainUnpickler(pickle.Unpickler):
    """Builds plain data only (dict, list, tuple, set, str, bytes, int, float, bool, None). Every other object, and
    every call a pickle can make, needs a global looked up by find_class, which refuses them all."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused {short(module, 40)}.{short(name, 40)}: only plain data is read")


def plain_loads(data: bytes):
    return PlainUnpickler(io.BytesIO(data)).load()


def jpeg(image: np.ndarray) -> bytes:
    """As Flow-GRPO's client: PIL's JPEG at its default quality (75)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class RewardServerClient(GuardedClient):
    """reward-server's transport: pickle out, pickle (labelled text/html by Flask) back, under the client's guards."""

    request_type = "application/octet-stream"
    answer_type = None

    def call(self, payload: dict) -> dict:
        answer = self._post(pickle.dumps(payload))
        try:
            data = plain_loads(answer)
        except MALFORMED as err:  # a protocol error, never retried
            raise self.fail(f"answer is not a plain-data pickle ({type(err).__name__}: {short(err)})") from None
        if not isinstance(data, dict):
            raise self.fail(f"answer is a {type(data).__name__}, not a dict")
        return data

    def numbers(self, data: dict, key: str, n: int) -> list[float]:
        """data[key] as n finite floats, or this client's error."""
        values = data.get(key)
        if not isinstance(values, list) or len(values) != n:
            raise self.fail(f"answer's {key!r} is not a list of {n} numbers")
        wrong = [v for v in values if type(v) not in (int, float)]
        if wrong:
            raise self.fail(f"answer's {key!r} holds a {type(wrong[0]).__name__}, not a number")
        if not all(math.isfinite(v) for v in values):
            raise self.fail(f"answer's {key!r} has non-finite values")
        return [float(v) for v in values]


class RewardServerAdapter:
    """scorer(ScoreRequest) -> {metric: N numbers} by way of reward-server; `kind`: geneval or deqa."""

    def __init__(self, upstream: str, kind: str, timeout: float = 100.0, retries: int = 0, backoff: float = 1.0):
        if kind not in KINDS:
            raise ValueError(f"unknown reward-server kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.upstream = RewardServerClient(RemoteSettings(url=upstream, timeout=timeout, retries=retries,
                                                          backoff=backoff))

    def __call__(self, request: ScoreRequest) -> dict:
        return self.geneval(request) if self.kind == "geneval" else self.deqa(request)

    def geneval(self, request: ScoreRequest) -> dict:
        wanted = request.metrics or GENEVAL_METRICS
        chosen_metrics(dict.fromkeys(GENEVAL_METRICS), wanted, "GenEval")  # unknown names are the client's error
        for i, metadata in enumerate(request.metadata):
            if not isinstance(metadata.get("tag"), str) or not isinstance(metadata.get("include"), list):
                raise BadRequest(f"metadata[{i}] lacks GenEval's 'tag' and 'include' (a geneval_jsonl prompt file "
                                 "has them)")
        only_strict = "correct" not in wanted
        data = self.upstream.call({
            "images": [jpeg(image) for image in request.images],
            "meta_datas": [{**metadata, "prompt": prompt} for prompt, metadata in zip(request.prompts,
                                                                                      request.metadata)],
            "only_strict": only_strict,
        })
        n = len(request.images)
        fields = {"score": "scores", "strict": "strict_rewards", "correct": "rewards"}
        return {metric: self.upstream.numbers(data, fields[metric], n) for metric in wanted}

    def deqa(self, request: ScoreRequest) -> dict:
        chosen_metrics({"score": None}, request.metrics, "DeQA")
        data = self.upstream.call({"images": [jpeg(image) for image in request.images]})
        outputs = self.upstream.numbers(data, "outputs", len(request.images))
        return {"score": [DEQA_SCALE * x for x in outputs]}

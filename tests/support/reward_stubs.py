"""Stand-ins for GPU-scale scorers, shared by the reward tests and the SD3 pipeline test: a tiny random CLIP saved like
PickScore, a stub reward server for 127.0.0.1, `serving` (a scorer behind flowopd's own server on a thread) and
stand-ins for Flow-GRPO's reward-server with its function signatures."""

import contextlib
import io
import json
import pickle
import threading
import time
import traceback
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

from flowopd.rewards.remote import decode_png_base64
from flowopd.rewards.server import RewardHTTPServer


def save_tiny_clip(folder):
    """A tiny random CLIPModel and its processor, saved like yuvalkirstain/PickScore_v1 would be."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- remote: stub servers
class StubHandler(BaseHTTPRequestHandler):
    """Scores each image by its mean / 255; `mode` on the server: ok, flaky (500 twice), slow, bad_request,
    wrong_keys."""

    def do_POST(self):
        server = self.server
        server.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.bodies.append(body)
        if server.mode == "flaky" and server.calls <= 2:
            return self.reply(500, {"error": "warming up"})
        if server.mode == "slow":
            time.sleep(0.5)
        if server.mode == "bad_request":
            return self.reply(400, {"error": "images missing"})
        images = [decode_png_base64(x) for x in body["images"]]
        answer = {"score": [float(x.mean() / 255) for x in images],
                  "strict": [float(len(p)) for p in body["prompts"]],
                  "correct": [float(x.mean() > 127) for x in images],
                  "n_include": [float(len(m.get("include", []))) for m in body["metadata"]]}
        if server.mode == "wrong_keys":
            answer = {"score": answer["score"][:-1]}
        self.reply(200, answer)

    def reply(self, status, data):
        payload = json.dumps(data).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


# ---------------------------------------------------------------- flowopd's own server, on a thread
@contextlib.contextmanager
def serving(scorer, **options):
    """RewardHTTPServer(scorer) on 127.0.0.1 (a free port) for the block; yields the server (its .url)."""
    with running(RewardHTTPServer(("127.0.0.1", 0), scorer, quiet=True, **options)) as server:
        yield server


@contextlib.contextmanager
def running(server):
    """An HTTP server serving on a daemon thread for the block, shut down and closed after it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- Flow-GRPO's reward-server, stand-ins
def brightness(image: Image.Image) -> float:
    return float(np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255)


def compute_geneval(images, metadatas, only_strict=False):
    """reward-server's GenEval signature (reward_server/gen_eval.py): -> scores, rewards, strict_rewards,
    group_rewards, group_strict_rewards. Reads metadata['tag'] and ['prompt'] as it does; brightness stands in for
    the detector: score = brightness, strict = brighter than 1/2, correct (rewards) = brighter than 1/4, 0 when
    only_strict."""
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    scores, rewards, strict_rewards = [], [], []
    group_rewards, group_strict = defaultdict(list), defaultdict(list)
    for image, metadata in zip(images, metadatas):
        tag, _ = metadata["tag"], metadata["prompt"]
        value = brightness(image)
        scores.append(value)
        strict_rewards.append(1.0 if value > 0.5 else 0.0)
        rewards.append(0.0 if only_strict else (1.0 if value > 0.25 else 0.0))
        for key in tags:
            group_rewards[key].append(rewards[-1] if key == tag else -10.0)
            group_strict[key].append(strict_rewards[-1] if key == tag else -10.0)
    return scores, rewards, strict_rewards, dict(group_rewards), dict(group_strict)


def compute_deqascore(images):
    """reward-server's DeQA signature (reward_server/deqa.py): the 1-5 score divided by 5; brightness stands in."""
    return [(1.0 + 4.0 * brightness(image)) / 5 for image in images]


class RewardServerStandIn(BaseHTTPRequestHandler):
    """app_geneval.py / app_deqa.py as they answer: the body unpickled, JPEG images, the scorer's answer pickled
    (Flask labels it text/html), a traceback and HTTP 500 on any error. server.kind: geneval | deqa; server.payloads:
    what arrived; server.reply: bytes to answer instead (a hostile server); server.alive: False answers nothing."""

    def do_POST(self):
        server = self.server
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if not server.alive:  # died mid-batch: the connection drops without an answer
            self.close_connection = True
            return
        try:
            data = pickle.loads(data)  # the stand-in trusts its client, as reward-server does
            server.payloads.append(data)
            images = [Image.open(io.BytesIO(d), formats=["jpeg"]) for d in data["images"]]
            if server.kind == "geneval":
                scores, rewards, strict, groups, strict_groups = compute_geneval(images, data["meta_datas"],
                                                                                 data["only_strict"])
                response = {"scores": scores, "rewards": rewards, "strict_rewards": strict,
                            "group_rewards": groups, "group_strict_rewards": strict_groups}
            else:
                response = {"outputs": compute_deqascore(images)}
            body, status = pickle.dumps(response), 200
        except Exception:  # noqa: BLE001 (as Flask's app: any error is a traceback and a 500)
            body, status = traceback.format_exc().encode(), 500
        if server.reply is not None:
            body, status = server.reply, 200
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def reward_server_stand_in(kind: str):
    """A RewardServerStandIn of `kind` on 127.0.0.1 for the block; yields the server (.url, .payloads, .reply)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RewardServerStandIn)
    server.daemon_threads = True
    server.kind, server.payloads, server.reply, server.alive = kind, [], None, True
    server.url = f"http://127.0.0.1:{server.server_address[1]}/"
    with running(server):
        yield server

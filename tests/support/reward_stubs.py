"""Stand-ins for GPU-scale scorers, shared by the reward tests and the SD3 pipeline test: a tiny random CLIP saved like
PickScore, and a stub reward server for 127.0.0.1."""

import json
import time
from http.server import BaseHTTPRequestHandler

import torch

from flowopd.rewards.remote import decode_png_base64


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

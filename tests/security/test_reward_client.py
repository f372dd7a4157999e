"""The remote reward client against a hostile server on 127.0.0.1: redirects, scores of the wrong type, a trickling
or endless answer, broken transports. Each attack ends in a RemoteRewardError with a short message, and no score
from the hostile answer reaches the caller."""

import json
import socket
import socketserver
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from flowopd.rewards import get_reward
from flowopd.rewards import remote as remote_module
from flowopd.rewards.remote import MAX_ANSWER_BYTES, RemoteRewardError
from flowopd.spec import RemoteSettings

IMAGES = np.zeros((2, 8, 8, 3), dtype=np.uint8)
PROMPTS = ["a cat", "a dog"]
SECRET = "<html><body>internal stack trace: password=hunter2</body></html>"


class HostileHandler(BaseHTTPRequestHandler):
    """Answers every POST as `server.attack` says; records what happened on the server."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        server = self.server
        server.posts += 1
        if server.attack != "slow_reader":
            self.rfile.read(int(self.headers["Content-Length"]))
        getattr(self, server.attack)()

    def do_GET(self):
        self.server.gets += 1
        self.reply(200, json.dumps({"score": [0.99, 0.99]}).encode())

    def reply(self, status, body: bytes, kind="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def keep_writing(self, chunks):
        """Write until the client hangs up; the server records how much it got out and that it was cut off."""
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
                self.server.sent += len(chunk)
        except OSError:
            self.server.hung_up.set()

    # -- attacks ----------------------------------------------------------------------------------------------
    def redirect(self):
        self.reply(302, b"", headers=[("Location", "/stolen")])

    def answer(self):
        self.reply(200, self.server.answer)

    def trickle_body(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n")
        self.keep_writing(trickle(b" " * 200))

    def trickle_then_close(self):  # a body that ends when the connection does
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        self.keep_writing(trickle(b" " * 200))

    def trickle_status_line(self):
        self.keep_writing(trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: a\r\n" * 40))

    def trickle_headers(self):  # a status line at once, then headers that the deadline cuts
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self.keep_writing(trickle(b"X-Pad: a\r\n" * 40 + b"Content-Type: application/json\r\n\r\n"))

    def huge_length(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n")
        self.keep_writing(b"[" * 2**16 for _ in range(200000000 // 2**16))

    def endless(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        self.keep_writing(b"[" * 2**16 for _ in iter(int, 1))

    def endless_chunked(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.keep_writing(b"10000\r\n" + b"[" * 2**16 + b"\r\n" for _ in iter(int, 1))

    def reset(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # RST instead of an answer

    def html_500(self):
        self.reply(500, SECRET.encode(), kind="text/html")

    def html_404(self):
        self.reply(404, SECRET.encode(), kind="text/html")

    def html_200(self):
        self.reply(200, SECRET.encode(), kind="text/html")

    def slow_reader(self):
        self.server.hung_up.wait(10)  # never reads the request: the client's send blocks

    def log_message(self, *args):
        pass


def trickle(data: bytes, every: float = 0.05):
    for i in range(len(data)):
        time.sleep(every)
        yield data[i : i + 1]


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    httpd.daemon_threads = True
    httpd.posts = httpd.gets = httpd.sent = 0
    httpd.hung_up = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.hung_up.set()
    httpd.shutdown()
    httpd.server_close()


def client(server, attack, answer=None, **settings):
    server.attack, server.answer = attack, answer
    settings = {"url": f"http://127.0.0.1:{server.server_address[1]}/score", "retries": 0, **settings}
    reward = get_reward("remote", settings=RemoteSettings(**settings))
    reward.sleeps = []
    reward.sleep = reward.sleeps.append  # record the backoff instead of waiting
    return reward


def fails(reward, match):
    """The client's own error, short, without the server's page; no scores come back."""
    with pytest.raises(RemoteRewardError, match=match) as caught:
        reward(IMAGES, PROMPTS)
    message = str(caught.value)
    assert message.startswith("reward server http://127.0.0.1:") and len(message) < 300
    assert "hunter2" not in message and "<html>" not in message
    return message


# ---------------------------------------------------------------- redirects
def test_a_redirect_on_post_is_refused_not_followed(server):
    fails(client(server, "redirect", retries=3), r"HTTP 302 Found to '/stolen' refused: a POST is never redirected")
    assert server.posts == 1 and server.gets == 0  # not retried, and no GET without the images


# ---------------------------------------------------------------- strict scores
@pytest.mark.parametrize(("answer", "match"), [
    ('{"score": ["0.9", "0.8"]}', r"metric 'score' holds a str, not a number"),
    ('{"score": [true, false]}', r"metric 'score' holds a bool, not a number"),
    ('{"score": [0.5, null]}', r"metric 'score' holds a NoneType, not a number"),
    ('{"score": [[0.5], [0.5]]}', r"metric 'score' holds a list, not a number"),
    ('{"score": "0.9"}', r"metric 'score' is a str, not a list of numbers"),
    ('{"score": [0.5]}', r"metric 'score' has shape \(1,\), expected \(2,\)"),
    ('{"score": [0.5, 0.5, 0.5]}', r"metric 'score' has shape \(3,\), expected \(2,\)"),
    ('{"score": [NaN, 0.5]}', r"metric 'score' has non-finite values"),
    ('{"score": [1e999, 0.5]}', r"metric 'score' has non-finite values"),
    ('{"score": [' + "9" * 5000 + ", 1]}", r"metric 'score' has non-finite values"),
    ('{"score": [0.1, 0.1], "score": [0.9, 0.9]}', r"not valid JSON \(ValueError: duplicate keys"),
    ('{"strict": [1, 1]}', r"answer lacks metrics \['score'\]"),
    ("[0.5, 0.5]", r"answer is a list, not a JSON object"),
])
def test_scores_must_be_exactly_n_finite_numbers(server, answer, match):
    fails(client(server, "answer", answer.encode(), retries=3), match)
    assert server.posts == 1  # a broken protocol is not retried


def test_integers_are_numbers(server):
    out = client(server, "answer", b'{"score": [1, 0.25]}')(IMAGES, PROMPTS)
    np.testing.assert_array_equal(out["score"], [1.0, 0.25])
    assert out["score"].dtype == np.float64


# ---------------------------------------------------------------- one deadline per request
@pytest.mark.parametrize("attack", ["trickle_body", "trickle_then_close", "trickle_status_line",
                                    "trickle_headers"])
def test_a_trickling_server_cannot_outlast_the_deadline(server, attack):
    reward = client(server, attack, timeout=0.3, retries=1, backoff=0.5)
    fails(reward, r"2 attempts failed; last: timed out after 0.3 s")
    assert server.hung_up.wait(5) and server.posts == 2 and reward.sleeps == [0.5]
    assert server.sent < 100  # the client hung up long before the trickle ended


def test_a_trickled_tls_handshake_cannot_outlast_the_deadline():
    hung_up = threading.Event()

    class TrickleHello(socketserver.BaseRequestHandler):  # a "server hello" record, one byte at a time
        def handle(self):
            try:
                for byte in trickle(b"\x16\x03\x03\x40\x00" + b"\x00" * 200):
                    self.request.sendall(byte)
            except OSError:
                hung_up.set()

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), TrickleHello) as tcp:
        tcp.daemon_threads = True
        threading.Thread(target=tcp.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        url = f"https://127.0.0.1:{tcp.server_address[1]}/score"
        reward = get_reward("remote", settings=RemoteSettings(url=url, timeout=0.3, retries=0))
        with pytest.raises(RemoteRewardError, match=r"1 attempts failed; last: timed out after 0.3 s"):
            reward(IMAGES, PROMPTS)
        assert hung_up.wait(5)
        tcp.shutdown()


def test_a_server_that_never_reads_cannot_block_the_send(server, monkeypatch):
    monkeypatch.setattr(remote_module, "png_base64", lambda image: "A" * 2**24)  # 32 MB: more than socket buffers
    fails(client(server, "slow_reader", timeout=0.3), r"1 attempts failed; last: timed out after 0.3 s")
    assert server.posts == 1


# ---------------------------------------------------------------- a capped answer
def test_an_oversized_content_length_is_refused_before_reading(server):
    fails(client(server, "huge_length", retries=3), r"HTTP 200 OK: answer of 200000000 bytes is over the "
                                                    rf"{MAX_ANSWER_BYTES}-byte cap")
    assert server.hung_up.wait(5) and server.sent < 200000000 and server.posts == 1


@pytest.mark.parametrize("attack", ["endless", "endless_chunked"])
def test_an_endless_answer_stops_at_the_cap(server, attack):
    fails(client(server, attack, retries=3), rf"HTTP 200 OK: answer is over the {MAX_ANSWER_BYTES}-byte cap")
    assert server.hung_up.wait(5) and server.posts == 1


# ---------------------------------------------------------------- every failure is the client's error
@pytest.mark.parametrize(("attack", "answer", "match"), [
    ("answer", b"{not json", r"answer is not valid JSON \(JSONDecodeError: Expecting property name"),
    ("answer", b"\xff\xfe\xfa", r"answer is not valid JSON \(UnicodeDecodeError"),
    ("answer", b"[" * 100000, r"answer is not valid JSON \(RecursionError"),
    ("html_200", None, r"HTTP 200 OK: answer is text/html, not application/json"),
    ("html_404", None, r"HTTP 404 Not Found \(text/html, \d+ bytes\)$"),
])
def test_protocol_failures_are_short_client_errors(server, attack, answer, match):
    fails(client(server, attack, answer, retries=3), match)
    assert server.posts == 1


@pytest.mark.parametrize(("attack", "match"), [
    ("html_500", r"3 attempts failed; last: HTTP 500 Internal Server Error$"),
    ("reset", r"3 attempts failed; last: (ConnectionResetError|RemoteDisconnected|BadStatusLine)"),
])
def test_transport_failures_are_retried_then_short_client_errors(server, attack, match):
    reward = client(server, attack, retries=2, backoff=0.5)
    fails(reward, match)
    assert server.posts == 3 and reward.sleeps == [0.5, 1.0]


def test_a_refused_connection_is_a_client_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reward = get_reward("remote", settings=RemoteSettings(url=f"http://127.0.0.1:{port}/score", retries=1))
    reward.sleep = lambda seconds: None
    with pytest.raises(RemoteRewardError, match=r"2 attempts failed; last: ConnectionRefusedError"):
        reward(IMAGES, PROMPTS)


def test_credentials_in_the_url_stay_out_of_errors():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reward = get_reward("remote", settings=RemoteSettings(url=f"http://user:s3cret@127.0.0.1:{port}/score",
                                                          retries=0))
    with pytest.raises(RemoteRewardError, match=rf"reward server http://127.0.0.1:{port}/score: 1 attempts") as caught:
        reward(IMAGES, PROMPTS)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(RemoteRewardError, match=r"reward server http://127.0.0.1:99999/score: bad url"):
        get_reward("remote", settings=RemoteSettings(url="http://127.0.0.1:99999/score"))

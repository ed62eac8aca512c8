"""The reward server and its client on loopback: exact scores, a 4xx JSON error for every bad request
(the server keeps serving), limits checked before reading, retries and a clear final error."""

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdppo.rewards.client import HTTPReward, RewardServerError, encode_images
from flowdppo.rewards.server import Limits, main, make_server, parse_images

sys.path.insert(0, str(Path(__file__).parent))
from toy import brightness_reward  # noqa: E402


class Serving:
    def __init__(self, reward_fn, limits=None):
        self.server = make_server(reward_fn, "127.0.0.1", 0, limits, name="toy")
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


@pytest.fixture
def serving():
    s = Serving(brightness_reward, Limits(max_body_bytes=1 << 20, max_batch=4, max_side=64, read_timeout=0.5))
    yield s
    s.stop()


def _recv_all(s: socket.socket) -> str:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data.decode()


def _npy(arr) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def test_server_returns_exactly_the_in_process_scores(serving):
    client = HTTPReward(f"http://127.0.0.1:{serving.port}", chunk_size=2)  # 3 requests
    torch.manual_seed(0)
    images = torch.rand(5, 3, 8, 8)
    prompts = ["light", "dark", "light", "dark", "light"]
    got = client(prompts, images)
    want = brightness_reward(prompts, parse_images(encode_images(images)))  # what travels: uint8 pixels
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k].float())
    assert client.health() == {"status": "ok"}
    info = client.info()
    assert info["reward"] == "toy" and info["limits"]["max_batch"] == 4 and "version" in info
    with pytest.raises(ValueError, match="2 prompts for 5 images"):
        client(prompts[:2], images)


def test_every_bad_request_gets_a_json_4xx_and_the_server_keeps_serving(serving):
    good = np.zeros((2, 8, 8, 3), np.uint8)
    body = lambda obj: json.dumps(obj).encode()  # noqa: E731
    cases = [
        ("malformed JSON", body({"a": 1})[:-1], 400, "malformed JSON"),
        ("not an object", b"[1, 2, 3]", 400, "must be a JSON object"),
        ("not UTF-8", b"\xff\xfe\x00", 400, "malformed JSON"),
        ("missing images", body({"prompts": ["a"]}), 400, "lacks 'images'"),
        ("prompts not strings", body({"prompts": [1, 2], "images": _npy(good)}), 400, "list of strings"),
        ("bad base64", body({"prompts": ["a"], "images": "@@not base64@@"}), 400, "not valid base64"),
        ("not npy", body({"prompts": ["a"], "images": base64.b64encode(b"hello").decode()}), 400, "not a .npy"),
        ("float32", body({"prompts": ["a", "b"], "images": _npy(good.astype(np.float32))}), 400, "uint8"),
        ("RGBA", body({"prompts": ["a"], "images": _npy(np.zeros((1, 8, 8, 4), np.uint8))}), 400, "uint8 \\[B, H"),
        ("count mismatch", body({"prompts": ["a"], "images": _npy(good)}), 400, "1 prompts for 2 images"),
        (
            "batch limit",
            body({"prompts": ["a"] * 5, "images": _npy(np.zeros((5, 8, 8, 3), np.uint8))}),
            413,
            "limit is 4",
        ),
        ("side limit", body({"prompts": ["a"], "images": _npy(np.zeros((1, 65, 8, 3), np.uint8))}), 413, "65x8"),
        ("body limit", b" " * ((1 << 20) + 1), 413, "exceeds the limit"),
    ]
    for what, data, status, message in cases:
        got_status, got = serving.raw("POST", "/score", data, {"Content-Type": "application/json"})
        assert got_status == status, (what, got)
        assert "error" in got and __import__("re").search(message, got["error"]), (what, got)
    assert serving.raw("GET", "/nope")[0] == 404
    assert serving.raw("GET", "/score")[0] == 405
    # still serving
    ok, out = serving.raw("POST", "/score", body({"prompts": ["light", "dark"], "images": _npy(good)}))
    assert ok == 200 and len(out["rewards"]["bright"]) == 2


def test_limits_are_checked_before_the_body_is_read(serving):
    """A declared 257 MiB body (one 8200x8200 image) is refused from its Content-Length alone; a missing
    length is refused; a client that stalls mid-body gets a 408 after the read timeout."""
    with socket.create_connection(("127.0.0.1", serving.port), timeout=10) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (257 << 20))
        tic = time.monotonic()
        answer = _recv_all(s)
        assert time.monotonic() - tic < 5
    assert answer.startswith("HTTP/1.1 413") and "exceeds the limit of 1048576 bytes" in answer
    with socket.create_connection(("127.0.0.1", serving.port), timeout=10) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _recv_all(s).startswith("HTTP/1.1 411")
    with socket.create_connection(("127.0.0.1", serving.port), timeout=10) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = _recv_all(s)
    assert answer.startswith("HTTP/1.1 408") and "read-timeout" in answer
    assert serving.raw("GET", "/health")[0] == 200


def test_a_failing_reward_is_a_500_with_its_message_and_the_client_retries(capsys):
    calls = []

    def flaky(prompts, images):
        calls.append(len(prompts))
        if len(calls) <= 2:
            raise RuntimeError("model fell over")
        return {"r": torch.ones(len(prompts))}

    s = Serving(flaky)
    try:
        images = torch.rand(3, 3, 8, 8)
        client = HTTPReward(f"http://127.0.0.1:{s.port}", retries=3, backoff=0.01)
        assert client(["a", "b", "c"], images)["r"].tolist() == [1, 1, 1]  # third attempt
        assert calls == [3, 3, 3]
        calls.clear()
        client = HTTPReward(f"http://127.0.0.1:{s.port}", retries=1, backoff=0.01)
        with pytest.raises(
            RewardServerError, match="after 2 attempts: HTTP 500: the reward failed: RuntimeError: model"
        ):
            client(["a", "b", "c"], images)
        # a 4xx is not retried, and its text reaches the user
        with pytest.raises(RewardServerError, match=r"refused the request: HTTP 400: .*uint8") as e:
            client.request("POST", "/score", {"prompts": ["a"], "images": _npy(np.zeros((1, 2, 2, 3), np.int16))})
        assert f"127.0.0.1:{s.port}/score" in str(e.value)
    finally:
        s.stop()
    capsys.readouterr()  # the server printed the reward's traceback


def test_server_stopped_client_retries_then_names_the_url():
    s = Serving(brightness_reward)
    url = f"http://127.0.0.1:{s.port}"
    client = HTTPReward(url, retries=2, backoff=0.05, connect_timeout=2)
    images = torch.rand(2, 3, 8, 8)
    assert client(["light", "dark"], images)["bright"].shape == (2,)
    s.stop()  # stopped mid-run
    attempts = []
    real = client._exchange
    client._exchange = lambda *a: (attempts.append(time.monotonic()), real(*a))[1]
    with pytest.raises(RewardServerError, match=rf"{url}/score failed after 3 attempts: Connection\w*Error"):
        client(["light", "dark"], images)
    assert len(attempts) == 3
    gaps = np.diff(attempts)
    assert gaps[0] >= 0.02 and gaps[1] >= 0.05  # exponential backoff (x0.5..1.5 jitter) between attempts


def test_client_splits_by_bytes_and_rejects_bad_urls():
    client = HTTPReward("http://127.0.0.1:1", chunk_size=64, max_request_bytes=5 << 20)
    assert client._chunk(torch.zeros(64, 3, 512, 512)) == 4  # 4 x ~1 MiB of base64 per request
    with pytest.raises(ValueError, match="http://host:port"):
        HTTPReward("127.0.0.1:8765")


def test_main_parses_its_own_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--max-body-mb" in capsys.readouterr().out
    assert main(["--reward", "nosuch"]) == 2
    assert "unknown reward 'nosuch'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--reward", "jpeg", "--arg", "quality"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


SERVER = textwrap.dedent(
    """
    import sys, torch
    from flowdppo.rewards.server import make_server
    s = make_server(lambda p, x: {"r": torch.zeros(len(p))}, "127.0.0.1", 0)
    print(s.server_port, flush=True)
    s.serve_forever()
    """
)


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_a_257_mib_request_gets_413_and_the_server_stays_small():
    """One 8200x8200 image actually sent (257 MiB of JSON, streamed from one reused 1 MiB buffer):
    the server answers 413 and its peak memory grows by less than 32 MiB."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, env=env, text=True)
    try:
        port = int(proc.stdout.readline())
        before = _hwm_mib(proc.pid)
        n = 257 << 20
        chunk = b"A" * (1 << 20)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Length", str(n))
        conn.endheaders()
        try:
            for _ in range(n // len(chunk)):
                conn.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading after its answer
        resp = conn.getresponse()
        assert resp.status == 413 and "exceeds the limit" in json.loads(resp.read())["error"]
        conn.close()
        assert _hwm_mib(proc.pid) - before < 32
    finally:
        proc.terminate()
        proc.wait(10)

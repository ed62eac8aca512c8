"""Rewards over HTTP: score images in another process or on another machine (e.g. a GPU reward model).

Protocol (JSON over ``POST /score``)::

    request  {"prompts": [str, ...], "images": "<base64 of a .npy uint8 array [B, H, W, 3]>"}
    response {"rewards": {"<component>": [float, ...], ...}}

``flowdppo reward-server --reward shapes --port 8765`` serves any registered reward;
:class:`HTTPReward` is the client the trainer uses with ``reward.name=http reward.url=...``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import urllib.request
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch


def encode_images(images: torch.Tensor) -> str:
    """``[B, 3, H, W]`` in [0, 1] -> base64 .npy of uint8 ``[B, H, W, 3]``."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def decode_images(data: str) -> torch.Tensor:
    arr = np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


class HTTPReward:
    def __init__(self, url: str, timeout: float = 300.0, chunk_size: int = 64):
        self.url = url.rstrip("/") + "/score"
        self.timeout = timeout
        self.chunk_size = chunk_size  # images per request: keeps a 512^2 batch's payload to tens of MB

    def _post(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, list[float]]:
        body = json.dumps({"prompts": list(prompts), "images": encode_images(images)}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())["rewards"]

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        parts = [
            self._post(prompts[i : i + self.chunk_size], images[i : i + self.chunk_size])
            for i in range(0, len(prompts), self.chunk_size)
        ]
        rewards = {k: torch.tensor([x for p in parts for x in p[k]], dtype=torch.float32) for k in parts[0]}
        for k, v in rewards.items():
            if v.shape != (len(prompts),):
                raise ValueError(f"reward server returned {list(v.shape)} values for {k!r}, expected {len(prompts)}")
        return rewards


def make_server(reward_fn: Callable, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``reward_fn`` (``port=0`` picks a free port: see ``server.server_port``)."""
    lock = threading.Lock()  # reward models are rarely thread-safe

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self.send_error(404, "POST /score")
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = decode_images(req["images"])
                if len(req["prompts"]) != images.shape[0]:
                    raise ValueError(f"{len(req['prompts'])} prompts for {images.shape[0]} images")
                with lock:
                    rewards = reward_fn(req["prompts"], images)
                body = json.dumps({"rewards": {k: v.float().tolist() for k, v in rewards.items()}}).encode()
                self.send_response(200)
            except (KeyError, ValueError) as e:
                body = json.dumps({"error": str(e)}).encode()
                self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    from flowdppo.rewards import REWARDS

    p = argparse.ArgumentParser(prog="flowdppo reward-server", description="Serve a registered reward over HTTP.")
    p.add_argument("--reward", default="shapes", help=f"a reward ({REWARDS.valid()})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    server = make_server(REWARDS.get(args.reward)(), args.host, args.port)
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_port}/score")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0

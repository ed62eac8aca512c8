"""``flowdppo reward-server``: serve any reward the trainer can build over HTTP (protocol: ``client.py``).

    flowdppo reward-server --reward shapes --port 8765
    flowdppo reward-server --reward pickscore --arg device=cuda --arg dtype=float16
    flowdppo reward-server --reward mypkg.rewards:my_reward --arg scale=2

Hardening: a request must declare its ``Content-Length``, which is checked against ``--max-body-mb``
before a byte of the body is read (413); the ``.npy`` header is checked (dtype uint8, shape
``[B, H, W, 3]``, ``B <= --max-batch``, ``H, W <= --max-side``) before the pixels are decoded (400/413);
every socket read has a ``--read-timeout`` (408); at most ``--max-inflight`` requests are read and
scored at once (the rest wait), so the server's extra memory stays below about
``max_inflight * 7 * max_body`` (body, JSON string, decoded bytes, uint8 and float32 pixels).
Every bad request gets a JSON ``{"error": ...}`` with a 4xx status; a reward that raises gets a 500;
neither stops the server.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch


@dataclass
class Limits:
    max_body_bytes: int = 64 << 20  # 64 MiB: ~28 images of 512x512 per request (the client splits)
    max_batch: int = 256  # images per request
    max_side: int = 4096  # pixels, height and width
    read_timeout: float = 30.0  # seconds per socket read
    max_inflight: int = 2  # requests read and scored at once


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_images(data: str, limits: Limits | None = None) -> torch.Tensor:
    """base64 ``.npy`` uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [0, 1], validated before decoding."""
    if not isinstance(data, str):
        raise RequestError(400, f"'images' must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"'images' is not valid base64: {e}") from None
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)  # the header only: no pickle, no allocation
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/OSError/SyntaxError for bad headers
        raise RequestError(400, f"'images' is not a .npy array: {e}") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise RequestError(400, f"images must be uint8 [B, H, W, 3], got {dtype} {list(shape)}")
    if limits is not None:
        if shape[0] > limits.max_batch:
            raise RequestError(413, f"{shape[0]} images in one request; the limit is {limits.max_batch} (--max-batch)")
        if max(shape[1], shape[2]) > limits.max_side:
            raise RequestError(
                413, f"images of {shape[1]}x{shape[2]} pixels; the limit is {limits.max_side} a side (--max-side)"
            )
    if 0 in shape:
        raise RequestError(400, f"images must be non-empty, got shape {list(shape)}")
    n = int(np.prod(shape))
    body = raw[f.tell() :]
    if len(body) != n:
        raise RequestError(400, f"'images' holds {len(body)} bytes of pixels, its header {list(shape)} needs {n}")
    arr = np.frombuffer(body, dtype=np.uint8).reshape(shape[::-1] if fortran else shape)
    if fortran:
        arr = arr.transpose(3, 2, 1, 0)
    return torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).float() / 255.0


def parse_request(req, limits: Limits | None = None) -> tuple[list[str], torch.Tensor]:
    if not isinstance(req, dict):
        raise RequestError(
            400, f"the body must be a JSON object {{'prompts': [...], 'images': ...}}, got {type(req).__name__}"
        )
    missing = [k for k in ("prompts", "images") if k not in req]
    if missing:
        raise RequestError(400, f"the request lacks {', '.join(map(repr, missing))}; it needs 'prompts' and 'images'")
    prompts = req["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "'prompts' must be a list of strings")
    images = parse_images(req["images"], limits)
    if len(prompts) != images.shape[0]:
        raise RequestError(400, f"{len(prompts)} prompts for {images.shape[0]} images")
    return prompts, images


def _check_rewards(rewards, n: int) -> dict[str, list[float]]:
    if not isinstance(rewards, dict) or not rewards:
        raise TypeError(f"the reward returned {type(rewards).__name__}, expected a dict of [B] tensors")
    out = {}
    for k, v in rewards.items():
        t = torch.as_tensor(v).detach().float().cpu().reshape(-1)
        if t.numel() != n:
            raise ValueError(f"the reward returned {t.numel()} values for {k!r}, expected {n}")
        out[str(k)] = t.tolist()
    return out


def make_server(
    reward_fn: Callable,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits | None = None,
    name: str | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``reward_fn`` (``port=0`` picks a free port: see ``server.server_port``)."""
    from flowdppo import __version__

    limits = limits or Limits()
    score_lock = threading.Lock()  # reward models are rarely thread-safe
    inflight = threading.BoundedSemaphore(limits.max_inflight)
    info = {
        "reward": name or getattr(reward_fn, "__name__", type(reward_fn).__name__),
        "components": list(getattr(reward_fn, "components", None) or []) or None,
        "version": __version__,
        "image_size": list(s) if (s := getattr(reward_fn, "image_size", None)) else None,
        "limits": {
            "max_body_bytes": limits.max_body_bytes,
            "max_batch": limits.max_batch,
            "max_side": limits.max_side,
        },
    }

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.read_timeout  # every socket read (headers and body)
        protocol_version = "HTTP/1.1"
        error_content_type = "application/json"
        error_message_format = '{"error": "%(message)s: %(explain)s", "code": %(code)d}'

        def _reply(self, status: int, obj: dict, close: bool = False) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                self._reply(200, {"status": "ok"})
            elif path == "/info":
                self._reply(200, info)
            elif path == "/score":
                self._reply(405, {"error": "use POST /score"})
            else:
                self._reply(404, {"error": f"no route {self.path!r}; routes: POST /score, GET /health, GET /info"})

        def _discard_unread(self, n: int, seconds: float = 2.0) -> None:
            """After refusing a body unread: stop writing, then read and drop (64 KiB at a time, for at most
            ``seconds``) what the client still sends, so that it can read the answer instead of a reset."""
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.2)
                end = time.monotonic() + seconds
                while n > 0 and time.monotonic() < end:
                    chunk = self.connection.recv(min(n, 1 << 16))
                    if not chunk:
                        break
                    n -= len(chunk)
            except OSError:
                pass

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(411, "a Content-Length header is required")
            try:
                n = int(length)
            except ValueError:
                raise RequestError(400, f"bad Content-Length {length!r}") from None
            if n < 0:
                raise RequestError(400, f"bad Content-Length {length!r}")
            if n > limits.max_body_bytes:
                self._unread = n
                raise RequestError(
                    413,
                    f"body of {n} bytes exceeds the limit of {limits.max_body_bytes} bytes (--max-body-mb); "
                    "send fewer or smaller images per request",
                )
            data = self.rfile.read(n)
            if len(data) < n:
                raise RequestError(400, f"the body ended after {len(data)} of {n} bytes")
            return data

        def do_POST(self):  # noqa: N802
            if self.path.split("?")[0].rstrip("/") != "/score":
                self._reply(404, {"error": f"no route POST {self.path!r}; use POST /score"}, close=True)
                return
            with inflight:
                try:
                    try:
                        req = json.loads(self._read_body())
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise RequestError(400, f"malformed JSON: {e}") from None
                    prompts, images = parse_request(req, limits)
                    del req
                    with score_lock:
                        try:
                            rewards = _check_rewards(reward_fn(prompts, images), len(prompts))
                        except Exception as e:  # noqa: BLE001 - the reward's failure is reported, not fatal
                            traceback.print_exc()
                            raise RequestError(500, f"the reward failed: {type(e).__name__}: {e}") from None
                    self._reply(200, {"rewards": rewards})
                except RequestError as e:
                    # a refused body may be unread: close the connection rather than parse it as a request
                    self._reply(e.status, {"error": str(e)}, close=e.status != 500)
                    if getattr(self, "_unread", 0):
                        self._discard_unread(self._unread)
                except TimeoutError:
                    self._reply(408, {"error": f"no data for {limits.read_timeout} s (--read-timeout)"}, close=True)

        def log_message(self, *args):  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server((host, port), Handler)
    server.info = info
    return server


def main(argv: list[str] | None = None) -> int:
    import yaml

    from flowdppo.rewards import build_reward_by_name

    p = argparse.ArgumentParser(
        prog="flowdppo reward-server",
        description="Serve a reward over HTTP: POST /score, GET /health, GET /info (see docs/rewards.md).",
    )
    p.add_argument("--reward", default="shapes", help="a registered reward name or an import path 'pkg.mod:obj'")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="reward argument (YAML value)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8765)
    d = Limits()
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body limit (MiB)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per request")
    p.add_argument("--max-side", type=int, default=d.max_side, help="image height/width limit (pixels)")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout, help="seconds per socket read")
    p.add_argument("--max-inflight", type=int, default=d.max_inflight, help="requests read and scored at once")
    args = p.parse_args(argv)
    kwargs = {}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--arg {item!r}: expected KEY=VALUE")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            p.error(f"--arg {item!r}: bad YAML value ({str(e).splitlines()[0]})")
    for flag, v in [
        ("--max-body-mb", args.max_body_mb),
        ("--max-batch", args.max_batch),
        ("--max-side", args.max_side),
        ("--read-timeout", args.read_timeout),
        ("--max-inflight", args.max_inflight),
    ]:
        if not v > 0:
            p.error(f"{flag} must be positive, got {v}")
    limits = Limits(int(args.max_body_mb * 2**20), args.max_batch, args.max_side, args.read_timeout, args.max_inflight)
    try:
        reward_fn = build_reward_by_name(args.reward, kwargs)
    except (ValueError, ImportError, TypeError) as e:
        print(f"flowdppo reward-server: error: {e}")
        return 2
    server = make_server(reward_fn, args.host, args.port, limits, name=args.reward)
    print(f"serving reward {args.reward!r} on http://{args.host}:{server.server_port} (POST /score)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

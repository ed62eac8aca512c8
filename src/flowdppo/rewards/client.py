"""The client of ``flowdppo reward-server``: score images in another process or on another machine.

Protocol (JSON over HTTP)::

    POST /score   {"prompts": [str, ...], "images": "<base64 of a .npy uint8 array [B, H, W, 3]>"}
              ->  {"rewards": {"<component>": [float, ...], ...}}
    GET  /health  -> {"status": "ok"}
    GET  /info    -> {"reward": ..., "components": [...] | null, "version": ..., "image_size": [H, W] | null,
                      "limits": {"max_body_bytes": ..., "max_batch": ..., "max_side": ...}}

Every error is JSON ``{"error": "<message>"}`` with a 4xx status (the request is wrong: not retried) or a
5xx status (the server or its reward failed: retried).

:class:`HTTPReward` is what the trainer uses for ``reward.name=http reward.url=...``: it splits a batch
into requests of at most ``chunk_size`` images and ``max_request_bytes`` bytes, and retries connection
errors, timeouts and 5xx answers with exponential backoff and jitter; after the last attempt it raises
:class:`RewardServerError` naming the URL and the cause.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import random
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np
import torch


class RewardServerError(RuntimeError):
    """The reward server refused a request (4xx), kept failing (5xx), or could not be reached."""


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> uint8 ``[B, H, W, 3]`` (what travels; rounding as the server sees it)."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def encode_images(images: torch.Tensor) -> str:
    """``[B, 3, H, W]`` in [0, 1] -> base64 .npy of uint8 ``[B, H, W, 3]``."""
    buf = io.BytesIO()
    np.save(buf, images_to_uint8(images), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def decode_images(data: str) -> torch.Tensor:
    """The inverse of :func:`encode_images` (no limits: the server validates with its own)."""
    from flowdppo.rewards.server import parse_images

    return parse_images(data)


class HTTPReward:
    """A reward computed by a reward server at ``url`` (``http://host:port``; ``/score`` is appended).

    ``connect_timeout``/``read_timeout`` are seconds for opening the connection and for each read of the
    answer; ``retries`` is the number of attempts after the first on connection errors, timeouts and 5xx
    answers, waiting ``backoff * 2**attempt`` seconds (capped at ``max_backoff``) times a random factor
    in [0.5, 1.5] in between.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 300.0,
        chunk_size: int = 64,
        *,
        connect_timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_request_bytes: int = 48 << 20,
    ):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"reward.url must look like http://host:port, got {url!r}")
        if chunk_size < 1 or retries < 0 or timeout <= 0 or connect_timeout <= 0:
            raise ValueError("HTTPReward: chunk_size >= 1, retries >= 0 and positive timeouts are required")
        self.base = url.rstrip("/")
        self.url = self.base + "/score"
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self.read_timeout = timeout
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size  # images per request
        self.max_request_bytes = max_request_bytes  # keeps each body under the server's default 64 MiB limit
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._rng = random.Random()

    # -- one HTTP exchange -------------------------------------------------------------------------------
    def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(self.read_timeout)
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, self._prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """One call with retries; returns the decoded JSON answer or raises :class:`RewardServerError`."""
        body = None if payload is None else json.dumps(payload).encode()
        url = self.base + path
        cause = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.5)
                time.sleep(delay)
            try:
                status, data = self._exchange(method, path, body)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, DNS, ...
                cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            message = _error_text(data)
            if status >= 500:
                cause = f"HTTP {status}: {message}"
                continue
            if status >= 400:
                raise RewardServerError(f"reward server {url} refused the request: HTTP {status}: {message}")
            try:
                out = json.loads(data)
            except ValueError:
                raise RewardServerError(f"reward server {url} answered with malformed JSON: {data[:200]!r}") from None
            if not isinstance(out, dict):
                raise RewardServerError(f"reward server {url} answered {type(out).__name__}, expected a JSON object")
            return out
        raise RewardServerError(f"reward server {url} failed after {self.retries + 1} attempts: {cause}")

    def info(self) -> dict:
        return self.request("GET", "/info")

    def health(self) -> dict:
        return self.request("GET", "/health")

    # -- scoring ------------------------------------------------------------------------------------------
    def _chunk(self, images: torch.Tensor) -> int:
        per_image = 3 * images.shape[-1] * images.shape[-2] * 4 // 3 + 64  # base64 of uint8 pixels
        return max(1, min(self.chunk_size, self.max_request_bytes // per_image))

    def _post(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, list[float]]:
        out = self.request("POST", "/score", {"prompts": list(prompts), "images": encode_images(images)})
        rewards = out.get("rewards")
        if not isinstance(rewards, dict) or not rewards:
            raise RewardServerError(f"reward server {self.url} answered without a 'rewards' object: {str(out)[:200]}")
        return rewards

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        n = self._chunk(images)
        parts = [self._post(prompts[i : i + n], images[i : i + n]) for i in range(0, len(prompts), n)]
        names = list(parts[0])
        for p in parts[1:]:
            if list(p) != names:
                raise RewardServerError(f"reward server {self.url} returned components {list(p)}, then {names}")
        rewards = {}
        for k in names:
            try:
                rewards[k] = torch.tensor([float(x) for p in parts for x in p[k]], dtype=torch.float32)
            except (TypeError, ValueError):
                raise RewardServerError(f"reward server {self.url} returned non-numbers for {k!r}") from None
            if rewards[k].shape != (len(prompts),):
                raise RewardServerError(
                    f"reward server {self.url} returned {rewards[k].numel()} values for {k!r}, expected {len(prompts)}"
                )
        return rewards


def _error_text(data: bytes) -> str:
    try:
        out = json.loads(data)
        if isinstance(out, dict) and "error" in out:
            return str(out["error"])
    except ValueError:
        pass
    return data[:300].decode("utf-8", "replace").strip() or "(empty body)"

"""Load benchmark of ``flowdppo reward-server`` on loopback (a benchmark, not a test).

    python -m flowdppo.rewards.loadtest --clients 8 --requests 50 --batch 16 --size 64

Starts the server in a subprocess (``--reward``, default the shapes reward), runs ``--clients`` threads
that each send ``--requests`` ``POST /score`` requests of ``--batch`` random ``--size``² images through
:class:`~flowdppo.rewards.client.HTTPReward`, and prints requests/s and the p50/p99 latency. Then it
sends one real 257 MiB request (one 8200x8200 image, streamed from a reused 1 MiB buffer) and prints
the answer and the server's peak memory (``VmHWM``) before and after.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch


def zero_reward():
    """A reward that costs nothing (``--reward flowdppo.rewards.loadtest:zero_reward``): the server's own cost."""
    return lambda prompts, images: {"zero": torch.zeros(len(prompts))}


def _hwm_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _big_request(port: int, n: int) -> tuple[int, str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    tic = time.perf_counter()
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(n))
    conn.endheaders()
    chunk = b"A" * (1 << 20)
    try:
        for _ in range(n // len(chunk)):
            conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body, time.perf_counter() - tic


def main(argv: list[str] | None = None) -> int:
    from flowdppo.rewards.client import HTTPReward

    p = argparse.ArgumentParser(prog="python -m flowdppo.rewards.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--reward", default="shapes")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)

    cmd = [sys.executable, "-m", "flowdppo.rewards.server", "--reward", args.reward, "--port", "0"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = server.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        url = f"http://127.0.0.1:{port}"
        prompts = ["a red circle"] * args.batch
        rng = torch.Generator().manual_seed(0)
        images = torch.rand(args.batch, 3, args.size, args.size, generator=rng)
        HTTPReward(url)(prompts, images)  # warm-up
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client():
            c = HTTPReward(url, retries=0)
            for _ in range(args.requests):
                tic = time.perf_counter()
                try:
                    c(prompts, images)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - tic)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        tic = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - tic
        lat = np.array(latencies) * 1000
        print(
            f"{args.clients} clients x {args.requests} requests of {args.batch} images {args.size}^2, "
            f"reward {args.reward!r}: {len(lat) / wall:.1f} req/s ({len(lat) * args.batch / wall:.0f} images/s), "
            f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, errors {len(errors)}"
        )
        before = _hwm_mib(server.pid)
        status, body, secs = _big_request(port, 257 << 20)
        after = _hwm_mib(server.pid)
        print(f"257 MiB request: HTTP {status} in {secs:.2f} s: {body}")
        if before is not None:
            print(f"server peak memory (VmHWM): {before:.0f} MiB before, {after:.0f} MiB after")
        print(f"load: {open('/proc/loadavg').read().strip() if os.path.exists('/proc/loadavg') else 'n/a'}")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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


def slow_shapes(delay: float = 0.5, score: bool = True):
    """The shapes reward plus ``delay`` seconds per call (one call per rollout chunk): a reward that is not
    free, for measuring ``train.overlap_reward`` (``reward.name: flowdppo.rewards.loadtest:slow_shapes``).
    ``score=False`` only waits (like a remote scorer; every key 0: no training signal, timing only)."""
    from flowdppo.rewards import shapes_reward

    inner = shapes_reward()

    def fn(prompts, images):
        time.sleep(delay)
        if not score:
            return {k: torch.zeros(len(prompts)) for k in ("strict", "soft", "quality")}
        return inner(prompts, images)

    return fn


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


def overlap_bench(iterations: int, delay: float, chunk: int, score: bool = True) -> None:
    """Iteration time of the shapes demo with ``slow_shapes(delay)``, ``train.overlap_reward`` on and off,
    interleaved iteration by iteration (so machine load affects both alike)."""
    import tempfile

    from flowdppo.config import load_config
    from flowdppo.training.trainer import Trainer

    trainers = {}
    tmp = tempfile.mkdtemp(prefix="overlap-bench-")
    for on in (True, False):
        cfg = load_config(
            overrides=[
                "reward.name=flowdppo.rewards.loadtest:slow_shapes",
                f"reward.args={{delay: {delay}, score: {str(score).lower()}}}",
                f"train.rollout_batch_size={chunk}",
                f"train.overlap_reward={str(on).lower()}",
                "log.tensorboard=false",
            ]
        )
        trainers[on] = Trainer(cfg, run_dir=f"{tmp}/overlap-{on}")
    times: dict[bool, list[dict]] = {True: [], False: []}
    for it in range(iterations):
        for on in (True, False):
            tic = time.perf_counter()
            m = trainers[on].iteration_step(it)
            times[on].append(
                {"iteration": time.perf_counter() - tic, **{k: v for k, v in m.items() if k.startswith("time/")}}
            )
    n = trainers[True].cfg.train.prompts_per_iter * trainers[True].cfg.train.group_size
    what = "shapes reward" if score else "no scoring, wait only"
    print(
        f"shapes demo, {n} samples an iteration in chunks of {chunk}: {-(-n // chunk)} reward calls ({what}) +{delay} s"
    )
    for on in (True, False):
        rows = times[on][1:] or times[on]  # the first iteration warms up
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        parts = ", ".join(f"{k[5:]} {v:.2f}" for k, v in mean.items() if k != "iteration")
        print(f"overlap_reward={on}: iteration {mean['iteration']:.2f} s ({parts}) over {len(rows)} iterations")


def main(argv: list[str] | None = None) -> int:
    from flowdppo.rewards.client import HTTPReward

    p = argparse.ArgumentParser(prog="python -m flowdppo.rewards.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--reward", default="shapes")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--overlap", action="store_true", help="instead: iteration time with train.overlap_reward on/off")
    p.add_argument("--iterations", type=int, default=4, help="--overlap: iterations of each (the first is warm-up)")
    p.add_argument("--delay", type=float, default=0.5, help="--overlap: seconds added to each reward call")
    p.add_argument("--chunk", type=int, default=32, help="--overlap: train.rollout_batch_size")
    p.add_argument("--wait-only", action="store_true", help="--overlap: the reward only waits (no shapes scoring)")
    args = p.parse_args(argv)
    if args.overlap:
        overlap_bench(args.iterations, args.delay, args.chunk, score=not args.wait_only)
        print(f"load: {open('/proc/loadavg').read().strip() if os.path.exists('/proc/loadavg') else 'n/a'}")
        return 0

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

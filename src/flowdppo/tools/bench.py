"""Benchmarks that are run by hand, never by the test suite.

``flowdppo bench log-ratio``: the fp32 error of the step log-ratio, as a difference of two reduced
log-probs and as formed from the means, against float64 (max over a batch, in units of std[log r]).

``flowdppo bench speed`` (:mod:`flowdppo.tools.bench_speed`): per-phase iteration time, achieved FLOP/s
against the measured matmul peak, the Flow-DPPO / Flow-GRPO iteration ratio, memory per process.

``python -m flowdppo.tools.bench losses`` times the Flow-DPPO loss (exact KL from the step means + mask +
surrogate, forward and backward) against the PPO-clip loss (surrogate only) on ``[B, S, C, H, W]``
tensors, default ``[16, 3, 16, 64, 64]`` (SD3.5 latents at 512^2, 3 SDE steps).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from flowdppo.core.losses import LossInputs, LossSpec, policy_loss, reduce_loss
from flowdppo.core.sde import gaussian_kl


def _time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench_losses(shape: tuple[int, ...] = (16, 3, 16, 64, 64), repeats: int = 20, device: str = "cpu") -> dict:
    b, s = shape[:2]
    g = torch.Generator(device="cpu").manual_seed(0)
    mean_old = torch.randn(shape, generator=g).to(device)
    mean_new0 = (mean_old.cpu() + 1e-3 * torch.randn(shape, generator=g)).to(device)
    std = torch.full((b, s), 0.5, device=device)
    logp_old = torch.randn(b, s, generator=g).to(device)
    logp_new0 = (logp_old.cpu() + 1e-3 * torch.randn(b, s, generator=g)).to(device)
    adv = torch.randn(b, generator=g).to(device)

    def run(name: str) -> None:
        mean_new = mean_new0.clone().requires_grad_(True)
        logp_new = logp_new0.clone().requires_grad_(True)
        kl = None
        if name in ("flow-dppo", "grpo-guard"):
            kl = gaussian_kl(
                mean_new.detach().reshape(b * s, *shape[2:]), mean_old.reshape(b * s, *shape[2:]), std.reshape(-1)
            ).view(b, s)
        inp = LossInputs(
            logp_new=logp_new,
            logp_old=logp_old,
            adv=adv,
            kl=kl,
            mean_new=mean_new,
            mean_old=mean_old,
            std=std,
            dt=torch.full((b, s), 0.05, device=device),
        )
        loss, _ = policy_loss(inp, LossSpec(name=name))
        reduce_loss(loss).backward()
        if device != "cpu":
            torch.cuda.synchronize()

    out = {
        "shape": list(shape),
        "device": device,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    for name in ("clip", "flow-dppo", "grpo-guard"):
        out[f"{name}_ms"] = 1e3 * _time(lambda name=name: run(name), repeats)
    out["flow_dppo_over_clip"] = out["flow-dppo_ms"] / out["clip_ms"]
    return out


def bench_log_ratio(
    latent: tuple[int, ...] = (16, 64, 64), batch: int = 32, kls=(1e-10, 1e-8, 1e-6, 1e-4), stds=(0.22, 0.05)
) -> list[dict]:
    """Error of the fp32 log-ratio against float64 on the same fp32 inputs: as a difference of two reduced
    log-probs vs from the means (:func:`flowdppo.core.sde.gaussian_log_ratio`), in units of std[log r]."""
    import math

    from flowdppo.core.sde import gaussian_log_prob, gaussian_log_ratio

    rows = []
    n = math.prod(latent)
    for std_value in stds:
        for kl in kls:
            g = torch.Generator().manual_seed(0)
            mean_old = torch.randn(batch, *latent, generator=g)
            direction = torch.randn(batch, *latent, generator=g)
            direction = direction / direction.flatten(1).norm(dim=1).view(-1, *([1] * len(latent)))
            mean_new = mean_old + direction * (std_value * math.sqrt(2 * kl * n))
            x = mean_old + std_value * torch.randn(batch, *latent, generator=g)
            std = torch.full((batch,), std_value)
            xd, nd, od = x.double(), mean_new.double(), mean_old.double()
            exact = (((xd - od) ** 2 - (xd - nd) ** 2) / (2 * std_value**2)).flatten(1).mean(1)
            diff = gaussian_log_prob(x, mean_new, std) - gaussian_log_prob(x, mean_old, std)
            means = gaussian_log_ratio(x, mean_new, mean_old, std)
            spread = float(exact.std())
            rows.append(
                {
                    "dims": n,
                    "std": std_value,
                    "kl_mean": kl,
                    "std_log_r": spread,
                    "difference_err_max": float((diff.double() - exact).abs().max()) / spread,
                    "from_means_err_max": float((means.double() - exact).abs().max()) / spread,
                    "difference_sign_flips": int(((diff > 0) != (exact > 0)).sum()),
                    "from_means_sign_flips": int(((means > 0) != (exact > 0)).sum()),
                    "batch": batch,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """``bench losses ...`` and ``bench speed ...`` here; anything else is the evidence bench
    (:mod:`flowdppo.tools.evidence`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "speed":  # its own options (flowdppo bench speed --help)
        from flowdppo.tools import bench_speed

        return bench_speed.main(argv[1:])
    if not argv or argv[0] not in ("losses", "log-ratio"):
        from flowdppo.tools.evidence import main as evidence_main

        return evidence_main(argv)
    p = argparse.ArgumentParser(
        prog="flowdppo bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("losses", help="Flow-DPPO vs PPO-clip loss time")
    lp.add_argument("--shape", default="16,3,16,64,64", help="B,S,C,H,W")
    lp.add_argument("--repeats", type=int, default=20)
    lp.add_argument("--device", default="cpu")
    lr = sub.add_parser("log-ratio", help="fp32 log-ratio error: difference of log-probs vs from the means")
    lr.add_argument("--latent", default="16,64,64", help="C,H,W (default: SD3.5 latents at 512^2)")
    lr.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    if args.what == "log-ratio":
        rows = bench_log_ratio(tuple(int(x) for x in args.latent.split(",")), args.batch)
        print(f"{'dims':>7} {'std':>5} {'KL (mean)':>9} {'std[log r]':>10} {'diff err':>9} {'means err':>9} flips")
        for r in rows:
            print(
                f"{r['dims']:>7} {r['std']:>5} {r['kl_mean']:>9.0e} {r['std_log_r']:>10.3g} "
                f"{r['difference_err_max']:>9.3g} {r['from_means_err_max']:>9.2g} "
                f"{r['difference_sign_flips']}/{r['batch']} vs {r['from_means_sign_flips']}/{r['batch']}"
            )
        return 0
    if args.what == "losses":
        res = bench_losses(tuple(int(x) for x in args.shape.split(",")), args.repeats, args.device)
        print(json.dumps(res, indent=2))
        print(
            f"Flow-DPPO / PPO-clip time: {res['flow_dppo_over_clip']:.2f}x "
            f"({res['flow-dppo_ms']:.2f} ms vs {res['clip_ms']:.2f} ms per forward+backward on {res['shape']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

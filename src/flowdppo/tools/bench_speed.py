"""``flowdppo bench speed``: where an iteration's time goes, how close it runs to the machine's peak,
what Flow-DPPO costs over Flow-GRPO, and how memory per process scales with the process count.

Run by hand, never by the test suite (a smoke test runs it at toy sizes). What it measures, in one run:

- **peak**: dense fp32 ``torch.mm`` FLOP/s of this machine with this process's threads (median of
  repeats of an ``n x n`` product; ``2 n^3`` FLOPs each);
- **phases**, per geometry and preset (the trainer's defaults, so ``train.anchor=auto``; ``--set
  train.anchor=replay`` measures the replayed anchor) (``flow-dppo`` and ``flow-grpo``, iterations interleaved so that
  a change of machine load hits both alike): the median seconds of the whole iteration and of its
  rollout, reward, anchor and training phases, from the trainer's own ``time/*`` metrics;
- **FLOP/s**: each phase's model FLOPs (one forward and one forward+backward counted with
  ``torch.utils.flop_counter`` at the training micro-batch, times the number of forwards the phase
  makes; training that back-propagates through the rollout's kept graphs, ``train.rollout_graph``, counts
  the backward only) over its median time, and as a fraction of the peak measured in the same run;
- **ratio**: Flow-DPPO / Flow-GRPO iteration time (ratio of medians, and median of the paired ratios);
- **memory** (``--procs 1,2``): one iteration of Flow-DPPO in 1 and in 2 gloo processes at the same
  global batch, each process reporting the bytes of the trajectories and anchor it holds and its peak
  resident memory;
- **anchor** (``--compare-anchor``): Flow-DPPO again with ``train.anchor=replay``, interleaved with the
  others, and the iteration ratio of the configured anchor (default ``auto``) over the replayed one;
- **busy** (``--busy``): the shapes Flow-DPPO iteration in a fresh process started while one competing
  2-thread matmul loop runs (so it chooses its thread settings on a busy machine, as a user's run would),
  against the quiet figure of the same run.

Geometries: ``shapes`` is the demo's (the shipped model, 8 prompts x 16 samples, 10 steps, 3 SDE
steps, one mini-batch of 64); ``sd3`` is a tiny SD3 transformer (diffusers ``SD3Transformer2DModel``,
4 layers, hidden 128, 16x8x8 latents, patch 2, 205 text tokens as SD3 with 77 CLIP + 128 T5 tokens)
with random weights and LoRA r32, 4 prompts x 4 samples, 10 steps of which 9 are trained. Its text
encoder is the shapes model's word encoder (prompts are encoded once and cached, so the loop never
runs it); ``--sd3-path DIR`` runs a saved diffusers SD3 pipeline through the SD3 adapter instead, e.g. the
one ``--save-sd3 DIR`` writes (the same geometry as a real ``StableDiffusion3Pipeline`` with random weights and
character tokenizers; docs/BENCHMARKS.md, P3, runs flow_grpo's trainer on it).

Machine load changes every figure but the FLOP counts and the byte counts: the output records
``os.getloadavg()`` before and after, and the thread settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PHASES = ("rollout", "reward", "anchor", "train")
PRESETS = ("flow-dppo", "flow-grpo")
REPLAYED = "flow-dppo/anchor=replay"  # --compare-anchor

COMMON = [
    "log.tensorboard=false",
    "log.progress=false",
    "log.checkpoint_every=0",
    "eval.every=0",
    "eval.ratio_noise_every=0",
]
SHAPES_DEMO: list[str] = []  # the demo's defaults (config.py): 8 x 16 samples, 10 steps, 3 SDE steps
SD3_TINY = [
    "train.prompts_per_iter=4",
    "train.group_size=4",
    "train.minibatch_size=16",
    "train.micro_batch_size=8",
    "train.rollout_batch_size=16",
    "sampling.num_steps=10",
    "sampling.schedule=uniform-shift",
    "sampling.shift=3.0",
    "steps.strategy=fraction",
    "steps.start=0.0",
    "steps.end=0.9",
    "model.lora_rank=32",
    "model.lora_alpha=32",
    "reward.weights={bright: 1.0}",
]
SD3_TRANSFORMER = {  # the tiny SD3 geometry (random weights)
    "image_size": 8,
    "channels": 16,
    "patch_size": 2,
    "num_layers": 4,
    "num_heads": 2,
    "head_dim": 64,
    "text_dim": 64,
    "text_layers": 1,
    "text_heads": 2,
    "max_tokens": 205,
    "default_shift": 3.0,
}
SMOKE = [
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.minibatch_size=4",
    "train.micro_batch_size=2",
    "train.rollout_batch_size=4",
    "sampling.num_steps=4",
    "steps.strategy=random",
    "steps.num_sde_steps=2",
    "steps.end=0.5",
]
SMOKE_SD3_TRANSFORMER = dict(SD3_TRANSFORMER, num_layers=1, head_dim=16, max_tokens=8)


# ---------------------------------------------------------------------------- helpers


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def mm_peak(n: int = 1024, repeats: int = 10) -> float:
    """Dense fp32 matmul FLOP/s (median over ``repeats`` products of ``n x n`` matrices)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / _median(times)


def bright_reward(prompts: Sequence[str], images) -> dict:
    """A cheap reward for geometries without a world of their own: mean brightness."""
    return {"bright": images.float().mean(dim=tuple(range(1, images.dim())))}


def tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (dicts, lists, dataclasses)."""
    import dataclasses

    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if hasattr(obj, "tensors") and isinstance(obj.tensors, dict):  # Cond
        return tensor_bytes(obj.tensors, seen)
    return 0


def build_trainer(geometry: str, preset: str, run_dir: str, smoke: bool = False, sd3_path: str | None = None, extra=()):
    """A trainer of ``geometry`` (``shapes`` / ``sd3``) with ``preset``; logs go to ``run_dir``."""
    from flowdppo.config import load_config
    from flowdppo.training.trainer import Trainer

    overrides = list(COMMON) + (SHAPES_DEMO if geometry == "shapes" else SD3_TINY)
    if smoke:
        overrides += SMOKE
    kwargs: dict[str, Any] = {"eval_sets": {}, "run_dir": run_dir}
    if geometry == "shapes":
        if smoke:
            overrides += ["model.lora_rank=4"]
    elif geometry == "sd3":
        kwargs["reward_fn"] = bright_reward
        if sd3_path:
            from flowdppo.worlds import shapes

            # beside the run directory, not in it: a run directory that holds a file is refused as a reused one
            prompts_file = Path(run_dir).with_name(Path(run_dir).name + "-prompts.txt")
            prompts_file.parent.mkdir(parents=True, exist_ok=True)
            prompts_file.write_text("\n".join(p.text for p in shapes.prompt_sets(seed=0)["train"][:64]) + "\n")
            overrides += [
                "model.family=sd3",
                f"model.path={sd3_path}",
                "model.resolution=64",
                "model.max_sequence_length=128",
                f"train.prompts_file={prompts_file}",
            ]
        else:
            from flowdppo.models.shapes_model import ShapesFlowModel

            cfg = load_config(preset=preset, overrides=overrides + list(extra))
            model = ShapesFlowModel.from_config(SMOKE_SD3_TRANSFORMER if smoke else SD3_TRANSFORMER, seed=0)
            model.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha, tuple(cfg.model.lora_targets))
            kwargs["model"] = model
    else:
        raise ValueError(f"unknown geometry {geometry!r}; valid: shapes, sd3")
    cfg = load_config(preset=preset, overrides=overrides + list(extra))
    return Trainer(cfg, **kwargs)


def forward_flops(trainer) -> dict[str, float]:
    """Model FLOPs per sample of one no-grad forward and of one forward+backward, at the micro-batch size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = trainer.cfg
    m = cfg.train.micro_batch_size
    model = trainer.model
    prompts = trainer.train_prompts[:1] * m
    cond = trainer.encode(prompts).to(model.device)
    x = torch.randn((m, *model.latent_shape), device=model.device)
    sigma = torch.full((m,), 0.5, device=model.device)
    g = cfg.sampling.guidance_scale
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.velocity(x, sigma, cond, g)
    fwd = fc.get_total_flops() / m
    with FlopCounterMode(display=False) as fc:
        model.velocity(x, sigma, cond, g).float().square().mean().backward()
    fb = fc.get_total_flops() / m
    model.module.zero_grad(set_to_none=True)
    return {"forward": fwd, "forward_backward": fb}


def phase_flops(trainer, per_sample: dict[str, float]) -> dict[str, float]:
    """FLOPs of each phase of one iteration: forwards made x FLOPs per forward (the anchor: a replay of
    every trained step, or a reused anchor's spot check; plus the reference-KL forwards at beta = 0)."""
    cfg, t = trainer.cfg, trainer.cfg.train
    b = t.prompts_per_iter * t.group_size
    n = cfg.sampling.num_steps
    s = len(trainer.step_sel.select(n, t.seed, 0))
    fwd, fb = per_sample["forward"], per_sample["forward_backward"]
    reuse = getattr(trainer, "reuse_anchor", False)
    anchor_fwd = min(t.anchor_check_samples, b) if reuse else b * s
    # the reference-KL forwards at beta = 0 are in the median iteration only when they run every iteration
    # (every train.ref_kl_every > 1 iterations they are in the rare iterations the median leaves out)
    if t.log_ref_kl and not trainer.loss_spec.needs_reference and t.ref_kl_every == 1:
        anchor_fwd += min(t.ref_kl_samples or b, b) * s
    ref = 1 if trainer.loss_spec.needs_reference else 0
    # a kept rollout graph (train.rollout_graph): training makes the backward of the rollout's forwards only
    train_fb = fb - fwd if getattr(trainer, "keep_rollout_graph", False) else fb
    return {
        "rollout": b * n * fwd,
        "anchor": anchor_fwd * fwd,
        "train": t.inner_epochs * b * s * (train_fb + ref * fwd),
    }


def time_iterations(trainers: dict[str, Any], iterations: int, warmup: int, progress: bool = True) -> dict:
    """Interleaved iterations of every trainer; per trainer the list of per-iteration seconds."""
    names = list(trainers)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    total = (warmup + iterations) * len(names)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench speed", unit="it", leave=False, file=sys.stderr)
    for i in range(warmup + iterations):
        order = names if i % 2 == 0 else names[::-1]  # alternate who goes first
        for name in order:
            tic = time.perf_counter()
            m = trainers[name].iteration_step(i)
            wall = time.perf_counter() - tic
            if bar is not None:
                bar.update(1)
            if i < warmup:
                continue
            row = {"iteration": wall}
            row.update({p: float(m.get(f"time/{p}", 0.0)) for p in PHASES})
            rows[name].append(row)
    if bar is not None:
        bar.close()
    return rows


def summarise(rows: list[dict[str, float]], flops: dict[str, float], peak: float) -> dict:
    med = {k: _median([r[k] for r in rows]) for k in ("iteration", *PHASES)}
    out: dict[str, Any] = {"seconds": med, "n": len(rows), "flops": flops}
    out["flop_per_s"] = {p: flops[p] / med[p] for p in flops if med.get(p)}
    out["fraction_of_peak"] = {p: v / peak for p, v in out["flop_per_s"].items()}
    return out


class Competitor:
    """One competing process running a 2-thread fp32 matmul loop (default OpenMP settings)."""

    CODE = (
        "import sys, torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\na @ a\n"
        "print('ready', flush=True)\nwhile True:\n    a @ a\n"
    )

    def __enter__(self) -> Competitor:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], env=env, stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # it has imported torch and multiplies: the machine is busy from here on
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_run(
    world: int, geometry: str, smoke: bool, sd3_path: str | None, out_dir: Path, extra: Sequence[str] = ()
) -> list[dict]:
    """One Flow-DPPO iteration in ``world`` gloo processes; each process's report."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        threads = max(1, (os.cpu_count() or 1) // world)  # the processes share the machine
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if world == 1:
            for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        out = out_dir / f"mem-w{world}-r{rank}.json"
        cmd = [sys.executable, "-m", "flowdppo.tools.bench_speed", "--memory-worker", str(out), "--models", geometry]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--sd3-path", sd3_path] if sd3_path else []
        cmd += [a for kv in extra for a in ("--set", kv)]
        procs.append((subprocess.Popen(cmd, env=env), out))
    reports = []
    for p, out in procs:
        if p.wait(timeout=3600) != 0:
            raise RuntimeError(f"memory worker failed (exit {p.returncode}): {' '.join(map(str, p.args))}")
        reports.append(json.loads(out.read_text()))
    return reports


def busy_run(iterations: int, smoke: bool, out_dir: Path, extra: Sequence[str] = ()) -> dict:
    """The shapes Flow-DPPO iteration timed in a fresh process started beside a :class:`Competitor`: like a
    user's run on a busy machine, that process chooses its own thread settings (this process's choices are
    not passed on; the user's are). Returns the worker's report: ``rows`` and the ``env`` it ran with."""
    from flowdppo import threads

    out = out_dir / "busy.json"
    cmd = [sys.executable, "-m", "flowdppo.tools.bench_speed", "--busy-worker", str(out), "--models", "shapes"]
    cmd += ["--iterations", str(iterations)] + (["--smoke"] if smoke else [])
    cmd += [a for kv in extra for a in ("--set", kv)]
    with Competitor():
        proc = subprocess.run(cmd, env=threads.without_choices(os.environ), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"busy worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(out.read_text())


def busy_worker(out: str, iterations: int, smoke: bool, extra: Sequence[str] = ()) -> None:
    """Inside the process of :func:`busy_run`: one warm-up and ``iterations`` timed Flow-DPPO iterations."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer("shapes", "flow-dppo", str(Path(tmp) / "run"), smoke=smoke, extra=extra)
        rows = time_iterations({"flow-dppo": tr}, iterations, 1, progress=False)["flow-dppo"]
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    Path(out).write_text(json.dumps({"rows": rows, "env": env}))


def memory_worker(out: str, geometry: str, smoke: bool, sd3_path: str | None, extra: Sequence[str] = ()) -> None:
    """Inside one of the processes of :func:`memory_run`."""
    held: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(geometry, "flow-dppo", str(Path(tmp) / "run"), smoke=smoke, sd3_path=sd3_path, extra=extra)
        collect, anchor = tr.collect, tr.anchor

        seen: set = set()

        def counted_collect(*a, **k):
            res = collect(*a, **k)
            held["trajectories"] = tensor_bytes(res[0], seen)
            return res

        def counted_anchor(*a, **k):
            res = anchor(*a, **k)
            # only what the anchor adds: a reused rollout tensor is counted once, with the trajectories
            held["anchor"] = tensor_bytes({k: v for k, v in res.items() if k != "metrics"}, seen)
            return res

        tr.collect, tr.anchor = counted_collect, counted_anchor
        tr.iteration_step(0)
        report = {
            "rank": tr.dist.rank,
            "world": tr.dist.world,
            "bytes": held,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if tr.dist.active:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    Path(out).write_text(json.dumps(report))


# ---------------------------------------------------------------------------- the command


def _checkpoint(res: dict, args: argparse.Namespace) -> None:
    """Keep what is measured so far (``--json``) and show it: a later failure loses nothing."""
    res["loadavg_after"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not args.quiet:
        print(format_summary(res), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    import torch

    geometries = [g for g in args.models.split(",") if g]
    for g in geometries:
        if g not in ("shapes", "sd3"):
            raise SystemExit(f"flowdppo bench speed: --models: {g!r} is not valid; valid: shapes, sd3")
    procs = [int(p) for p in args.procs.split(",") if p]
    if any(p < 1 for p in procs):
        raise SystemExit("flowdppo bench speed: --procs: process counts must be >= 1, e.g. 1,2")
    res: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "loadavg_before": list(os.getloadavg()),
        "smoke": args.smoke,
        "overrides": list(args.set),
    }
    peak = mm_peak(128 if args.smoke else args.mm_size, 3 if args.smoke else 10)
    res["peak_mm_flop_per_s"] = peak
    with tempfile.TemporaryDirectory() as tmp:
        for geo in geometries:
            trainers = {
                p: build_trainer(
                    geo, p, str(Path(tmp) / f"{geo}-{p}"), smoke=args.smoke, sd3_path=args.sd3_path, extra=args.set
                )
                for p in PRESETS
            }
            if args.compare_anchor:  # Flow-DPPO with the anchor replayed, interleaved with the other two
                trainers[REPLAYED] = build_trainer(
                    geo,
                    "flow-dppo",
                    str(Path(tmp) / f"{geo}-replayed"),
                    smoke=args.smoke,
                    sd3_path=args.sd3_path,
                    extra=[*args.set, "train.anchor=replay"],
                )
            rows = time_iterations(trainers, args.iterations, args.warmup, progress=not args.quiet)
            out: dict[str, Any] = {}
            for p, tr in trainers.items():
                out[p] = summarise(rows[p], phase_flops(tr, forward_flops(tr)), peak)
            if args.compare_anchor:
                paired = [a["iteration"] / b["iteration"] for a, b in zip(rows["flow-dppo"], rows[REPLAYED])]
                out["anchor_as_configured_over_replayed"] = {
                    "ratio_of_medians": out["flow-dppo"]["seconds"]["iteration"]
                    / out[REPLAYED]["seconds"]["iteration"],
                    "median_paired_ratio": _median(paired),
                    "paired": paired,
                    "anchor_seconds": [out["flow-dppo"]["seconds"]["anchor"], out[REPLAYED]["seconds"]["anchor"]],
                }
            paired = [a["iteration"] / b["iteration"] for a, b in zip(rows["flow-dppo"], rows["flow-grpo"])]
            out["dppo_over_grpo"] = {
                "ratio_of_medians": out["flow-dppo"]["seconds"]["iteration"] / out["flow-grpo"]["seconds"]["iteration"],
                "median_paired_ratio": _median(paired),
                "paired": paired,
            }
            if args.busy and geo == "shapes":
                report = busy_run(args.iterations, args.smoke, Path(tmp), args.set)
                busy = summarise(report["rows"], {}, peak)
                out["busy"] = {
                    "seconds": busy["seconds"],
                    "over_quiet": busy["seconds"]["iteration"] / out["flow-dppo"]["seconds"]["iteration"],
                    "env": report["env"],
                }
            res[geo] = out
            del trainers
            _checkpoint(res, args)
        if procs:
            geo = geometries[0] if geometries else "shapes"
            mem = {str(w): memory_run(w, geo, args.smoke, args.sd3_path, Path(tmp), args.set) for w in procs}
            res["memory"] = {"geometry": geo, "per_world": mem}
            if "1" in mem:
                base = mem["1"][0]["bytes"]
                res["memory"]["held_over_1_process"] = {
                    w: max(sum(r["bytes"].values()) for r in reps) / max(1, sum(base.values()))
                    for w, reps in mem.items()
                }
    res["loadavg_after"] = list(os.getloadavg())
    return res


def format_summary(res: dict) -> str:
    lines = [
        f"machine {res['machine']}, {res['cpus']} CPUs, torch {res['torch']}, {res['threads']} threads, "
        f"env {res['env']}, load {res['loadavg_before'][0]:.2f} -> {res['loadavg_after'][0]:.2f}",
        f"peak fp32 mm: {res['peak_mm_flop_per_s'] / 1e9:.1f} GFLOP/s",
    ]
    for geo in ("shapes", "sd3"):
        if geo not in res:
            continue
        out = res[geo]
        for p in PRESETS:
            s, f = out[p]["seconds"], out[p]["fraction_of_peak"]
            lines.append(
                f"{geo:6s} {p:9s} iteration {s['iteration']:.3f} s | "
                + " | ".join(
                    f"{ph} {s[ph]:.3f} s" + (f" ({100 * f[ph]:.0f}% peak)" if ph in f else "") for ph in PHASES
                )
            )
        r = out["dppo_over_grpo"]
        lines.append(
            f"{geo:6s} Flow-DPPO / Flow-GRPO iteration: {r['ratio_of_medians']:.3f} (ratio of medians), "
            f"{r['median_paired_ratio']:.3f} (median of {len(r['paired'])} paired ratios)"
        )
        if REPLAYED in out:
            s, r = out[REPLAYED]["seconds"], out["anchor_as_configured_over_replayed"]
            lines.append(
                f"{geo:6s} flow-dppo with the anchor replayed: iteration {s['iteration']:.3f} s, anchor "
                f"{s['anchor']:.3f} s; as configured / replayed: {r['ratio_of_medians']:.3f} (ratio of medians), "
                f"{r['median_paired_ratio']:.3f} (median of paired ratios)"
            )
        if "busy" in out:
            lines.append(
                f"{geo:6s} busy (one 2-thread matmul loop): iteration {out['busy']['seconds']['iteration']:.3f} s, "
                f"{out['busy']['over_quiet']:.2f}x the quiet figure (a fresh process; it chose "
                + ", ".join(f"{k}={v}" for k, v in out["busy"].get("env", {}).items() if v)
                + ")"
            )
    if "memory" in res:
        for w, reps in res["memory"]["per_world"].items():
            for r in reps:
                b = r["bytes"]
                lines.append(
                    f"memory {res['memory']['geometry']} {w} process(es), rank {r['rank']}: trajectories "
                    f"{b.get('trajectories', 0) / 2**20:.2f} MiB, anchor {b.get('anchor', 0) / 2**20:.2f} MiB, "
                    f"peak RSS {r['max_rss_bytes'] / 2**20:.0f} MiB"
                )
        for w, ratio in res["memory"].get("held_over_1_process", {}).items():
            lines.append(f"memory held per process, {w} process(es) / 1 process: {ratio:.2f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowdppo bench speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="shapes,sd3", help="geometries, comma-separated: shapes, sd3")
    p.add_argument("--sd3-path", help="a saved diffusers SD3 pipeline folder for the sd3 geometry")
    p.add_argument(
        "--save-sd3",
        metavar="DIR",
        help="only save the benchmark's random SD3 pipeline (64x64 images, 16x8x8 latents, 77 CLIP tokens, "
        "4 layers of hidden 128) to DIR, for --sd3-path and for other trainers, and exit",
    )
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per preset (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per preset first")
    p.add_argument("--procs", default="1,2", help="process counts for the memory measurement ('' to skip)")
    p.add_argument(
        "--compare-anchor",
        action="store_true",
        help="also time Flow-DPPO with train.anchor=replay, interleaved (the cost of replaying the anchor)",
    )
    p.add_argument("--busy", action="store_true", help="also time the shapes geometry beside a 2-thread matmul loop")
    p.add_argument("--mm-size", type=int, default=1024, help="matrix side of the peak measurement")
    p.add_argument("--smoke", action="store_true", help="toy sizes (seconds): checks the command, measures nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every trainer")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--busy-worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        raise SystemExit("flowdppo bench speed: --iterations must be >= 1 and --warmup >= 0")
    if args.save_sd3:
        from flowdppo.models.tiny_pipelines import save_tiny_pipeline

        if Path(args.save_sd3).exists() and any(Path(args.save_sd3).iterdir()):
            raise SystemExit(f"flowdppo bench speed: --save-sd3 {args.save_sd3}: the folder is not empty")
        print(save_tiny_pipeline("bench-sd3", args.save_sd3))
        return 0
    if args.memory_worker:
        memory_worker(args.memory_worker, args.models.split(",")[0], args.smoke, args.sd3_path, args.set)
        return 0
    if args.busy_worker:
        busy_worker(args.busy_worker, args.iterations, args.smoke, args.set)
        return 0
    res = run(args)
    print(format_summary(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    from flowdppo import threads

    threads.configure()  # as the flowdppo command does (torch is not imported yet)
    sys.exit(main())

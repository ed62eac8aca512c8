"""Checkpoints: ``run_dir/checkpoints/ckpt-<iteration>/`` and a ``latest`` pointer, written atomically.

A checkpoint holds the trained weights (``adapter.safetensors``: the LoRA or the full weights) and
``state.pt``: the completed iteration count, the optimizer state, the per-prompt stat tracker, the
torch / numpy / python RNG states and the logged history. Every random draw of an iteration is seeded
by ``(seed, iteration)``, so a run resumed from one reproduces the uninterrupted run. The last two
checkpoints are kept.

With several processes every one calls :func:`save_checkpoint` (FSDP2 gathers full tensors, DeepSpeed
writes its shards) and rank 0 writes the files; every process reads the same files on load.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo.training.distributed import Dist


def save_checkpoint(
    run_dir: Path,
    dist: Dist,
    model,
    params,
    optimizer,
    tracker,
    iteration: int,
    history: list[dict[str, Any]],
    sync: bool = True,
) -> Path:
    """Write ``checkpoints/ckpt-<iteration>`` (``iteration`` completed iterations; through a ``.tmp``
    folder) and point ``latest`` at it.

    ``sync=False`` skips the barriers (rank 0 alone, DDP only: an interrupted run)."""
    root = run_dir / "checkpoints"
    name = f"ckpt-{iteration:06d}"
    tmp, final = root / (name + ".tmp"), root / name
    weights = dist.full_state(model, params)  # full tensors on rank 0, None elsewhere
    optim = dist.optimizer_state(optimizer)
    if dist.is_main:
        root.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.save_engine(tmp)  # DeepSpeed: its sharded optimizer state, from every process
    if sync:
        dist.barrier()
    if not dist.is_main:
        if sync:
            dist.barrier()  # rank 0 has written the files
        return final
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
    torch.save(
        {
            "iteration": iteration,
            "optimizer": optim,
            "tracker": tracker.state_dict() if tracker else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "history": history,
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    done = sorted(p for p in root.glob("ckpt-*") if not p.name.endswith(".tmp"))
    for stale in done[:-2]:  # keep the last two
        shutil.rmtree(stale, ignore_errors=True)
    if sync:
        dist.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    latest = root / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"no checkpoint in {root}: nothing to resume")
    return root / latest.read_text().strip()


def load_checkpoint(path: Path, dist: Dist, model, params, optimizer, tracker) -> tuple[int, list[dict[str, Any]]]:
    """Restore weights, optimizer, tracker and RNG states from ``path``; returns ``(iteration, history)``."""
    from safetensors.torch import load_file

    # every process reads the same files (a shared file system for several nodes)
    dist.load_state(model, params, load_file(str(path / "adapter.safetensors")))
    state = torch.load(path / "state.pt", weights_only=False)
    dist.load_optimizer_state(optimizer, params, state["optimizer"])
    dist.load_engine(path)
    if tracker and state.get("tracker"):
        tracker.load_state_dict(state["tracker"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["iteration"]), list(state.get("history", []))

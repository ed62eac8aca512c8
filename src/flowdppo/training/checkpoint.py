"""Checkpoints: ``run_dir/checkpoints/ckpt-<iteration>/`` and a ``latest`` pointer, written atomically.

A checkpoint holds the trained weights (``adapter.safetensors``: the LoRA or the full weights) and
``state.pt``: the completed iteration count, the optimizer state, the per-prompt stat tracker, the
torch / numpy / python RNG states, the logged history and the run's log lines up to that iteration
(``metrics.jsonl`` and ``eval.jsonl`` are rewritten from them on resume, so a resumed run's logs have
exactly one line per iteration whatever interrupted it). Every random draw of an iteration is seeded by
``(seed, iteration)``, so a run resumed from one reproduces the uninterrupted run.

A checkpoint is only ever the state at an iteration boundary: the trainer takes a
:class:`Snapshot` at the start of each iteration and, when the iteration is interrupted, writes that
snapshot (never the half-updated model). Nothing non-finite is written (:class:`NonFiniteError`), the
files go to a ``.tmp`` folder renamed into place, ``latest`` is replaced atomically, the last two
complete checkpoints are kept, and :func:`latest_checkpoint` falls back to the newest complete one
when ``latest`` names a missing or incomplete folder.

With several processes every one calls :func:`save_checkpoint` (FSDP2 gathers full tensors, DeepSpeed
writes its shards) and rank 0 writes the files; every process reads the same files on load.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo.errors import NonFiniteError, UserError
from flowdppo.training import faults
from flowdppo.training.distributed import Dist

log = logging.getLogger("flowdppo")

FILES = ("adapter.safetensors", "state.pt")


@dataclass
class Snapshot:
    """The trainable state at an iteration boundary, in memory (CPU copies)."""

    iteration: int
    weights: dict[str, torch.Tensor] | None
    optimizer: dict | None
    tracker: dict | None
    rng: dict[str, Any]
    history: list[dict[str, Any]]
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def can_snapshot(dist: Dist) -> bool:
    """Every process holds its whole trainable state (one process, or DDP): a boundary snapshot is a copy."""
    return not dist._fsdp and dist._engine is None


def snapshot(dist: Dist, model, optimizer, tracker, iteration, history, records) -> Snapshot:
    """Copy the boundary state (weights, optimizer, tracker, RNG, logs) of this process."""
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.adapter_state_dict().items()}
    opt = copy.deepcopy(_to_cpu(optimizer.state_dict()))
    return Snapshot(
        iteration=iteration,
        weights=weights,
        optimizer=opt,
        tracker=copy.deepcopy(tracker.state_dict()) if tracker else None,
        rng=rng_state(),
        history=list(history),
        records={k: list(v) for k, v in records.items()},
    )


def restore(snap: Snapshot, model, optimizer, tracker) -> None:
    """Put this process back at the snapshot's boundary (weights, optimizer, tracker, RNG)."""
    model.load_adapter_state_dict(snap.weights)
    optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
    if tracker and snap.tracker is not None:
        tracker.load_state_dict(copy.deepcopy(snap.tracker))
    set_rng_state(snap.rng)
    for p in model.trainable_parameters():
        p.grad = None


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _check_finite(weights: dict[str, torch.Tensor], optimizer: dict | None, where: str) -> None:
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NonFiniteError(f"refusing to write checkpoint {where}: weight {k} holds non-finite values")
    for i, st in (optimizer or {}).get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                raise NonFiniteError(f"refusing to write checkpoint {where}: optimizer state {k} of parameter {i}")


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (Python's OSError carries the errno: ENOSPC, EROFS, ...)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _io_error(e: OSError, path: Path) -> OSError:
    """The same OSError naming ``path`` (``[Errno 28] No space left on device: 'PATH'``)."""
    if e.errno is None:
        return e
    return OSError(e.errno, os.strerror(e.errno), str(path))


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
    records: dict[str, list[dict[str, Any]]] | None = None,
    snap: Snapshot | None = None,
) -> Path:
    """Write ``checkpoints/ckpt-<iteration>`` (``iteration`` completed iterations; through a ``.tmp``
    folder) and point ``latest`` at it. ``snap`` writes that boundary snapshot instead of the live
    state (rank 0 alone).

    ``sync=False`` skips the barriers (rank 0 alone, DDP only: an interrupted run)."""
    root = run_dir / "checkpoints"
    if snap is not None:
        iteration, history, records = snap.iteration, snap.history, snap.records
        weights, optim, tracker_state, rng = snap.weights, snap.optimizer, snap.tracker, snap.rng
    else:
        weights = dist.full_state(model, params)  # full tensors on rank 0, None elsewhere
        optim = dist.optimizer_state(optimizer)
        tracker_state = tracker.state_dict() if tracker else None
        rng = rng_state()
    name = f"ckpt-{iteration:06d}"
    tmp, final = root / (name + ".tmp"), root / name
    if dist.is_main:
        _check_finite(weights, optim, str(final))
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise _io_error(e, tmp) from None
    if snap is None:
        dist.save_engine(tmp)  # DeepSpeed: its sharded optimizer state, from every process
    if sync:
        dist.barrier()
    if not dist.is_main:
        if sync:
            dist.barrier()  # rank 0 has written the files
        return final
    from safetensors.torch import save

    state = {
        "iteration": iteration,
        "optimizer": optim,
        "tracker": tracker_state,
        "rng": rng,
        "history": history,
        "records": records or {},
    }
    target = tmp / FILES[0]
    try:
        _write(target, save({k: v.detach().cpu().contiguous() for k, v in weights.items()}))
        faults.at("checkpoint", iteration - 1)  # a fault between the two files (tests; FLOWDPPO_FAULT)
        buf = io.BytesIO()
        torch.save(state, buf)
        target = tmp / FILES[1]
        _write(target, buf.getvalue())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _io_error(e, target) from None
        raise
    old = root / (name + ".old")
    if final.exists():  # the same boundary again (an interrupted run saves what it had): replace it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    for stale in complete_checkpoints(root)[:-2]:  # keep the last two
        shutil.rmtree(stale, ignore_errors=True)
    if sync:
        dist.barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders holding every file, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("ckpt-*") if p.suffix not in (".tmp", ".old") and p.is_dir()]
    return sorted((p for p in done if all((p / f).is_file() for f in FILES)), key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path:
    """The folder ``latest`` names, or the newest complete checkpoint when it names a missing or
    incomplete one."""
    root = run_dir / "checkpoints"
    complete = complete_checkpoints(root)
    latest = root / "latest"
    if latest.exists():
        named = root / latest.read_text().strip()
        if named in complete:
            return named
        if complete:
            log.warning("checkpoints/latest names %s, which is incomplete; using %s", named.name, complete[-1].name)
    if not complete:
        raise UserError(f"no complete checkpoint in {root}: nothing to resume (start again with --overwrite)")
    return complete[-1]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(weights, state)`` of the checkpoint folder ``path``; a corrupt or unreadable file is a
    :class:`UserError` naming it."""
    from safetensors.torch import load_file

    f = path / FILES[0]
    try:
        weights = load_file(str(f))
        f = path / FILES[1]
        state = torch.load(f, weights_only=False, map_location="cpu")
        if not isinstance(state, dict) or "iteration" not in state:
            raise ValueError("not a flowdppo checkpoint state")
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt file, named
        raise UserError(f"checkpoint file {f} is corrupt or unreadable ({type(e).__name__})") from None
    return weights, state


def load_checkpoint(path: Path, dist: Dist, model, params, optimizer, tracker) -> tuple[int, list[dict[str, Any]]]:
    """Restore weights, optimizer, tracker and RNG states from ``path``; returns ``(iteration, history)``."""
    return load_checkpoint_records(path, dist, model, params, optimizer, tracker)[:2]


def load_checkpoint_records(path: Path, dist: Dist, model, params, optimizer, tracker):
    """As :func:`load_checkpoint`, also returning the log records saved with it (``{}`` for old ones)."""
    weights, state = read_checkpoint(path)
    # every process reads the same files (a shared file system for several nodes)
    dist.load_state(model, params, weights)
    dist.load_optimizer_state(optimizer, params, state["optimizer"])
    dist.load_engine(path)
    if tracker and state.get("tracker"):
        tracker.load_state_dict(state["tracker"])
    set_rng_state(state["rng"])
    return int(state["iteration"]), list(state.get("history", [])), dict(state.get("records") or {})


def find_loadable(run_dir: Path) -> list[Path]:
    """Complete checkpoints, the one ``latest`` names first, then the others newest first."""
    root = run_dir / "checkpoints"
    first = latest_checkpoint(run_dir)
    rest = [p for p in reversed(complete_checkpoints(root)) if p != first]
    return [first, *rest]

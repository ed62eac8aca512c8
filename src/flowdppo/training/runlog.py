"""What a run writes as it goes: ``metrics.jsonl``, ``eval.jsonl``, TensorBoard events, the progress bar.

Only rank 0 writes (:func:`run_logger` gives every other process a :class:`NullLogger`). A resumed run
first drops the lines of the iterations it will redo, so each file has one line per iteration.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("flowdppo")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped with a
    warning, a bad line elsewhere is an error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (line %d)", path, i + 1)
                continue
            from flowdppo.errors import UserError

            raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` (through a temporary file renamed into place)."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


class RunLogger:
    """``metrics.jsonl`` (one line per iteration, flushed), ``eval.jsonl`` and optional TensorBoard events."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # pragma: no cover - tensorboard is a dependency
                log.warning("TensorBoard disabled: %s", e)

    def truncate_after(self, iteration: int) -> None:
        """Drop lines of iterations > ``iteration`` (a resumed run rewrites them); a torn last line goes too."""
        for path, first in ((self.path, 0), (self.eval_path, -1)):
            if path.exists():
                write_jsonl(path, [r for r in read_jsonl(path) if first <= r.get("iteration", first) <= iteration])

    def restore(self, records: dict[str, list[dict[str, Any]]]) -> None:
        """Rewrite ``metrics.jsonl`` and ``eval.jsonl`` as they were at a checkpoint (its saved records)."""
        write_jsonl(self.path, records.get("metrics", []))
        write_jsonl(self.eval_path, records.get("eval", []))

    def write(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        if self.tb is not None:
            it = record["iteration"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                    self.tb.add_scalar(k, v, it)
            self.tb.flush()

    def write_eval(self, iteration: int, results: dict[str, Any]) -> None:
        """One line of ``eval.jsonl``; ``iteration`` -1 is the evaluation before training."""
        append_jsonl(self.eval_path, {"iteration": iteration, **results})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What processes other than rank 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def write_eval(self, iteration: int, results: dict) -> None:
        pass

    def truncate_after(self, iteration: int) -> None:
        pass

    def restore(self, records: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run_logger(run_dir: Path, tensorboard: bool, is_main: bool) -> RunLogger | NullLogger:
    return RunLogger(run_dir, tensorboard) if is_main else NullLogger()


def mean_metrics(ms: list[dict[str, float]]) -> dict[str, float]:
    """Average per-mini-batch metrics; extremes keep their meaning (min of mins, max of maxes)."""
    out: dict[str, float] = {}
    for k in ms[0]:
        vals = [m[k] for m in ms if k in m]
        if k.endswith("_min"):
            out[k] = min(vals)
        elif k.endswith("_max"):
            out[k] = max(vals)
        else:
            out[k] = float(np.mean(vals))
    return out


class Progress:
    """A tqdm bar over the run's iterations showing reward, KL to the reference, trust-region activity
    and the first evaluation accuracy; does nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="flowdppo", unit="it", dynamic_ncols=True)

    def update(self, m: dict[str, Any]) -> None:
        if self.bar is None:
            return
        post = {"reward": f"{m['reward/total']:.3f}", "kl_ref": f"{m.get('kl_ref', float('nan')):.2e}"}
        if "masked_frac" in m:
            post["masked"] = f"{m['masked_frac']:.2f}"
        if "clip_frac" in m:
            post["clipped"] = f"{m['clip_frac']:.2f}"
        acc = [v for k, v in m.items() if k.startswith("eval/eval/strict") and k.count("/") == 2]
        if acc:
            post["eval_acc"] = f"{acc[0]:.3f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Fault injection: a run interrupted anywhere resumes to exactly the uninterrupted run.

Faults come from ``FLOWDPPO_FAULT=PHASE:ITERATION:ACTION`` (:mod:`flowdppo.training.faults`). Each
case runs the toy model for 3 iterations (evaluation after every one, a checkpoint every 2), injects
the fault in iteration 1, resumes, and compares metrics (timings aside), evaluation lines and final
weights with the uninterrupted run, bit for bit. Exceptions, SIGINT and SIGTERM run in this process
(SIGTERM through the CLI's handler); SIGKILL runs in a subprocess (tests/fault_worker.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowdppo.cli import _on_sigterm
from flowdppo.config import load_config
from flowdppo.errors import NonFiniteError, UserError
from flowdppo.training import checkpoint as ckpt
from flowdppo.training.faults import PHASES
from flowdppo.training.trainer import Trainer, resume

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fault_worker import BASE, build, finished_weights  # noqa: E402
from toy import PROMPTS, ToyModel, brightness_reward  # noqa: E402

ROOT = HERE.parent


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def comparable(run_dir: Path) -> tuple[list[dict], list[dict]]:
    ms = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines(run_dir / "metrics.jsonl")]
    return ms, lines(run_dir / "eval.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ref") / "run"
    build(d).run(progress=False)
    return d


def assert_same_run(a: Path, b: Path) -> None:
    ma, ea = comparable(a)
    mb, eb = comparable(b)
    assert [m["iteration"] for m in mb] == [0, 1, 2]
    assert [e["iteration"] for e in eb] == [-1, 0, 1, 2]
    assert ma == mb  # every metric, exactly
    assert ea == eb
    wa, wb = finished_weights(a), finished_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resume_to_end(run_dir: Path) -> None:
    tr = resume(
        run_dir, model=ToyModel(0), reward_fn=brightness_reward, prompts=PROMPTS, eval_sets={"eval": PROMPTS[:4]}
    )
    tr.run(progress=False)


# every phase once by default (each action twice); the rest of the matrix is slow
DEFAULT = {("rollout", "raise"), ("reward", "sigterm"), ("anchor", "sigint"), ("train", "sigint")}
DEFAULT |= {("eval", "raise"), ("checkpoint", "sigterm")}
MATRIX = [
    pytest.param(p, a, marks=() if (p, a) in DEFAULT else pytest.mark.slow)
    for p in PHASES
    for a in ("raise", "sigint", "sigterm")
]


@pytest.mark.parametrize(("phase", "action"), MATRIX)
def test_interrupt_anywhere_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, reference, phase, action):
    monkeypatch.setenv("FLOWDPPO_FAULT", f"{phase}:1:{action}")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Python's own SIGINT handler, also where the shell started this process with SIGINT ignored (a
    # background job of a non-interactive shell), which would leave the injected SIGINT without effect
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        tr = build(tmp_path / "run")
        expected = {"raise": RuntimeError, "sigint": KeyboardInterrupt, "sigterm": KeyboardInterrupt}[action]
        with pytest.raises(expected) as info:
            tr.run(progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    note = getattr(info.value, "flowdppo_note", "")
    # iteration 1 was interrupted: the boundary after iteration 0 is what is saved (after the checkpoint of
    # iteration 1 itself was cut, too: its files are written after the iteration committed, so 0..1)
    done = 2 if phase == "checkpoint" else 1
    assert f"iterations 0..{done - 1} checkpointed" in note and "--resume" in note
    assert tr.iteration == done
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    resume_to_end(tmp_path / "run")
    assert_same_run(reference, tmp_path / "run")


@pytest.mark.parametrize("phase", [p if p == "train" else pytest.param(p, marks=pytest.mark.slow) for p in PHASES])
def test_sigkill_anywhere_resumes_to_the_uninterrupted_run(tmp_path, reference, phase):
    """SIGKILL in iteration 2 saves nothing: the periodic checkpoint after iterations 0-1 holds, and the
    resumed run rewrites the logs from the lines saved with it (no duplicate, no lost line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWDPPO_FAULT": f"{phase}:2:sigkill"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(HERE / "fault_worker.py"), str(tmp_path / "run")], env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL
    resume_to_end(tmp_path / "run")
    assert_same_run(reference, tmp_path / "run")


def test_a_torn_metrics_line_resumes_and_reports(tmp_path, reference):
    d = tmp_path / "run"
    build(d).run(progress=False, stop_after=2)
    with open(d / "metrics.jsonl", "a") as f:  # a kill in the middle of a write
        f.write('{"iteration": 2, "reward/tot')
    with open(d / "eval.jsonl", "a") as f:
        f.write('{"iteration": 2, "ev')
    from flowdppo.report import write_report

    write_report(d)  # the report reads past the torn line
    resume_to_end(d)
    assert_same_run(reference, d)


def test_latest_pointing_at_a_missing_folder_falls_back(tmp_path, reference):
    d = tmp_path / "run"
    build(d).run(progress=False, stop_after=2)  # checkpoints ckpt-000002 (periodic) and latest -> it
    (d / "checkpoints" / "latest").write_text("ckpt-000009")  # a kill between the remove and the rename
    assert ckpt.latest_checkpoint(d).name == "ckpt-000002"
    resume_to_end(d)
    assert_same_run(reference, d)


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    d = tmp_path / "run"
    tr = build(d, ["log.checkpoint_every=1"])
    tr.run(progress=False, stop_after=2)
    (d / "checkpoints" / "ckpt-000002" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"checkpoint file .*ckpt-000002/state.pt is corrupt"):
        ckpt.read_checkpoint(d / "checkpoints" / "ckpt-000002")
    resume_to_end(d)  # resumes from ckpt-000001
    assert_same_run(reference, d)


def test_reusing_a_run_name_is_refused(tmp_path):
    build(tmp_path / "run").run(progress=False, stop_after=1)
    with pytest.raises(UserError, match=r"already holds a run; continue it with flowdppo train --resume .*--overwrite"):
        build(tmp_path / "run")
    before = lines(tmp_path / "run" / "metrics.jsonl")
    assert [m["iteration"] for m in before] == [0]


# ------------------------------------------------------------------ non-finite guards


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.model.adapter_state_dict().items()}


def _checkpoint_bytes(d: Path) -> dict[str, bytes]:
    latest = ckpt.latest_checkpoint(d)
    return {f: (latest / f).read_bytes() for f in ckpt.FILES}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_reward_for_one_sample_stops_before_any_step(tmp_path, bad):
    armed = {"on": False}

    def reward(prompts, images):
        out = brightness_reward(prompts, images)
        if armed["on"]:  # the first scoring call of iteration 1: its first chunk
            armed["on"] = False
            out["bright"][5] = bad
        return out

    d = tmp_path / "run"
    cfg = load_config(overrides=BASE + ["log.checkpoint_every=1", "eval.every=0"])
    tr = Trainer(cfg, model=ToyModel(0), reward_fn=reward, prompts=PROMPTS, eval_sets={"eval": PROMPTS[:4]}, run_dir=d)
    tr.run(progress=False, stop_after=1)
    weights, saved = _state(tr), _checkpoint_bytes(d)
    steps = tr.optimizer.state_dict()["state"]
    armed["on"] = True
    with pytest.raises(
        NonFiniteError, match=rf"reward component 'bright' is {bad} for sample 5 \(prompt '.*'\) of iteration 1"
    ):
        tr.run(progress=False)
    assert all(torch.equal(weights[k], v) for k, v in _state(tr).items())  # no optimizer step
    assert tr.optimizer.state_dict()["state"].keys() == steps.keys()
    assert _checkpoint_bytes(d) == saved  # the last good checkpoint, untouched
    assert tr.iteration == 1


def test_a_nan_loss_stops_before_the_step_and_rolls_back(tmp_path):
    """NaN inside the training forward (the second mini-batch): the first step is rolled back too."""
    d = tmp_path / "run"
    cfg = load_config(overrides=BASE + ["log.checkpoint_every=1", "eval.every=0"])
    model = ToyModel(0)
    tr = Trainer(cfg, model=model, reward_fn=brightness_reward, prompts=PROMPTS, eval_sets={}, run_dir=d)
    tr.run(progress=False, stop_after=1)
    weights, saved = _state(tr), _checkpoint_bytes(d)
    velocity = model.velocity
    count = {"n": 0}

    def poisoned(x, sigma, cond, guidance_scale=1.0):
        v = velocity(x, sigma, cond, guidance_scale)
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] > 3:  # past the first mini-batch's forwards
                return v * float("nan")
        return v

    model.velocity = poisoned
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss nan for sample \d+ at SDE step \d+; the optimizer step is rolled back"
    ):
        tr.run(progress=False)
    assert all(torch.equal(weights[k], v) for k, v in _state(tr).items())
    assert _checkpoint_bytes(d) == saved
    for p in model.trainable_parameters():
        assert torch.isfinite(p).all()


def test_an_infinite_learning_rate_is_refused_and_would_be_caught(tmp_path):
    from flowdppo.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.lr=inf is not valid; valid: a finite number > 0"):
        load_config(overrides=BASE + ["train.lr=inf"])
    # set on the optimizer behind the config's back: the step's result is caught, nothing is kept
    d = tmp_path / "run"
    tr = build(d, ["log.checkpoint_every=1", "eval.every=0"])
    tr.run(progress=False, stop_after=1)
    weights, saved = _state(tr), _checkpoint_bytes(d)
    for g in tr.optimizer.param_groups:
        g["lr"] = float("inf")
    with pytest.raises(NonFiniteError):
        tr.run(progress=False)
    assert all(torch.equal(weights[k], v) for k, v in _state(tr).items())
    assert _checkpoint_bytes(d) == saved


def test_nothing_non_finite_is_ever_checkpointed(tmp_path):
    d = tmp_path / "run"
    tr = build(d, ["log.checkpoint_every=1", "eval.every=0"])
    tr.run(progress=False, stop_after=1)
    saved = _checkpoint_bytes(d)
    with torch.no_grad():
        next(iter(tr.model.trainable_parameters())).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="refusing to write checkpoint"):
        tr.save_checkpoint()
    assert _checkpoint_bytes(d) == saved and not list((d / "checkpoints").glob("*.tmp"))


def test_disk_full_names_no_space_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import errno

    d = tmp_path / "run"
    tr = build(d, ["log.checkpoint_every=1", "eval.every=0"])
    tr.run(progress=False, stop_after=1)
    saved = _checkpoint_bytes(d)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write", full)
    tr.iteration += 1
    with pytest.raises(OSError, match=r"No space left on device: '.*ckpt-000002.tmp/adapter.safetensors'"):
        tr.save_checkpoint()
    assert _checkpoint_bytes(d) == saved and ckpt.latest_checkpoint(d).name == "ckpt-000001"
    assert not list((d / "checkpoints").glob("*.tmp"))

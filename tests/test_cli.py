"""The command line as a user meets it: every command's ``--help`` through the installed ``flowdppo``
entry point, and every command line of README.md's usage block, run with a tiny configuration.

The entry point is the console script pip installed (``flowdppo`` next to this Python, or on PATH);
``PYTHONPATH`` points it at this tree's sources, so a worktree tests its own code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

COMMANDS = ["train", "report", "presets", "pretrain", "sample", "bench", "bench-real", "reward-server"]

# a run of the shipped shapes model that takes seconds: 2 prompts x 2 samples, 4 steps, 2 eval prompts
TINY_TRAIN = [
    "train.iterations=1",
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.minibatch_size=4",
    "train.micro_batch_size=4",
    "train.rollout_batch_size=4",
    "sampling.num_steps=4",
    "steps.num_sde_steps=1",
    "eval.num_prompts=2",
    "eval.samples_per_prompt=1",
    "eval.grid_prompts=1",
    "eval.ratio_noise_every=0",
    "log.tensorboard=false",
    "log.progress=false",
]
TINY_SETS = [a for kv in TINY_TRAIN for a in ("--set", kv)]
TINY_SHAPES_MODEL = {"num_layers": 1, "num_heads": 2, "head_dim": 8, "text_dim": 16, "text_layers": 1, "text_heads": 2}


def entry_point() -> str:
    """The ``flowdppo`` console script of this Python's environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "flowdppo"
    found = str(local) if local.exists() else shutil.which("flowdppo")
    assert found, "the flowdppo entry point is not installed (pip install -e .)"
    return found


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def flowdppo(args: list[str], cwd: Path | str = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([entry_point(), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_through_the_entry_point(command):
    r = flowdppo([command, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: flowdppo {command}"), r.stdout[:200]
    assert "unrecognized arguments" not in r.stderr


def test_top_level_help_lists_every_command():
    r = flowdppo(["--help"])
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


def readme_usage_lines() -> list[str]:
    """The command lines of the README's "Using it" code block (comments stripped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no 'Using it' bash block"
    return [ln.split("  #")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]


def _tiny_sd3_adapter(tmp: Path) -> tuple[str, str]:
    """A tiny random SD3 pipeline folder and a LoRA adapter exported for it (as training writes one)."""
    import torch

    from flowdppo.config import ModelConfig
    from flowdppo.models import build_model
    from flowdppo.models.tiny_pipelines import IMAGE_SIZE, save_tiny_pipeline

    path = save_tiny_pipeline("sd3", str(tmp / "sd3"))
    m = build_model(
        ModelConfig(family="sd3", path=path, resolution=IMAGE_SIZE, max_sequence_length=16, lora_rank=2, lora_alpha=4)
    )
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05)
    adapter = tmp / "runs" / "x" / "adapter"
    m.save_adapter(str(adapter))
    return path, str(adapter)


def _serve_and_score(argv: list[str], cwd: Path) -> None:
    """Start the reward server, score two images through the HTTP reward client, stop it."""
    import torch

    from flowdppo.rewards.http import HTTPReward

    proc = subprocess.Popen(
        [entry_point(), *argv], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://[\d.]+:(\d+)", line)
        assert m, line
        out = HTTPReward(f"http://127.0.0.1:{m.group(1)}")(["a red circle", "two squares"], torch.zeros(2, 3, 32, 32))
        assert set(out) == {"strict", "soft", "quality", "tifa_atom", "tifa_prompt"} and out["strict"].shape == (2,)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# each README usage line -> the options appended to make it tiny (nothing else is changed)
README_EXTRA: dict[str, list[str]] = {
    "flowdppo train": TINY_SETS,
    "flowdppo train --preset flow-grpo --name grpo": TINY_SETS,
    "flowdppo train --config my.yaml --set train.lr=1e-4 --set algorithm.delta=1e-6": TINY_SETS + ["--name", "mine"],
    "flowdppo train --resume runs/grpo": ["--set", "train.iterations=2"],
    "flowdppo report runs/grpo": [],
    "flowdppo presets": [],
    "flowdppo pretrain --out DIR": [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--config",
        json.dumps(TINY_SHAPES_MODEL),
        "--eval-samples",
        "1",
        "--threads",
        "1",
        "--quiet",
    ],
    'flowdppo sample --model-family sd3 --model-path PATH --adapter runs/x/adapter --prompt "..."': [
        "--num-steps",
        "2",
        "--device",
        "cpu",
        "--out",
        "samples",
    ],
    "flowdppo reward-server --reward shapes": ["--port", "0"],
    "python -m flowdppo.tools.gradsignal --same-prompts": TINY_SETS[:-4] + ["--batches", "2", "--threads", "1"],
}


def readme_line(line: str, tmp_path: Path, **subst: str) -> subprocess.CompletedProcess:
    argv = [subst.get(a, a) for a in shlex.split(line)] + README_EXTRA[line]
    if argv[0] == "python":
        cmd = [sys.executable, *argv[1:]]
    else:
        cmd = [entry_point(), *argv[1:]]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{line}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, line
    return r


def test_the_readme_usage_block_is_covered():
    lines = readme_usage_lines()
    assert set(lines) == set(README_EXTRA), f"README usage lines changed: {sorted(set(lines) ^ set(README_EXTRA))}"


@pytest.mark.slow
def test_readme_train_resume_report_presets_lines(tmp_path):
    (tmp_path / "my.yaml").write_text("train:\n  iterations: 1\n")
    for line in [ln for ln in README_EXTRA if ln.split()[1] in ("train", "report", "presets")]:
        readme_line(line, tmp_path)
    runs = tmp_path / "runs"
    assert [json.loads(ln)["iteration"] for ln in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (runs / "grpo" / "checkpoints" / "ckpt-000002").is_dir()
    assert (runs / "flowdppo" / "adapter").is_dir() and (runs / "mine" / "report.md").exists()
    cfg = (runs / "mine" / "config.yaml").read_text()
    assert "lr: 0.0001" in cfg and "delta: 1.0e-06" in cfg


def test_readme_reward_server_line(tmp_path):
    line = "flowdppo reward-server --reward shapes"
    _serve_and_score(shlex.split(line)[1:] + README_EXTRA[line], tmp_path)


@pytest.mark.slow
def test_readme_gradsignal_line(tmp_path):
    r = readme_line("python -m flowdppo.tools.gradsignal --same-prompts", tmp_path)
    res = json.loads(r.stdout)
    assert res["batches"] == 2 and -1 <= res["agreement"] <= 1


@pytest.mark.slow
def test_readme_pretrain_line(tmp_path):
    readme_line("flowdppo pretrain --out DIR", tmp_path, DIR=str(tmp_path / "DIR"))
    assert (tmp_path / "DIR" / "model.safetensors").exists()


@pytest.mark.slow
def test_readme_sample_line(tmp_path):
    sd3_path, _ = _tiny_sd3_adapter(tmp_path)
    readme_line(
        'flowdppo sample --model-family sd3 --model-path PATH --adapter runs/x/adapter --prompt "..."',
        tmp_path,
        PATH=sd3_path,
    )
    meta = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert meta["family"] == "sd3" and len(meta["images"]) == 1

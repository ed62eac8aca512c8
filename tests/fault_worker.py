"""The toy run of tests/test_faults.py, and its subprocess entry (for SIGKILL):

FLOWDPPO_FAULT=PHASE:1:sigkill python tests/fault_worker.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from flowdppo.config import load_config  # noqa: E402
from flowdppo.training.trainer import Trainer  # noqa: E402
from toy import PROMPTS, ToyModel, brightness_reward  # noqa: E402

# 3 iterations of 4 prompts x 4 samples, an evaluation after every iteration, a checkpoint every 2
BASE = [
    "train.iterations=3",
    "train.prompts_per_iter=4",
    "train.group_size=4",
    "train.minibatch_size=8",
    "train.micro_batch_size=4",
    "train.rollout_batch_size=8",
    "train.lr=0.02",
    "sampling.num_steps=6",
    "eval.every=1",
    "eval.num_prompts=4",
    "reward.weights={bright: 1.0}",
    "log.tensorboard=false",
    "log.checkpoint_every=2",
    "eval.ratio_noise_every=1",
    "eval.ratio_noise_samples=8",
]


def build(run_dir: Path, extra: list[str] = ()) -> Trainer:
    cfg = load_config(overrides=BASE + list(extra))
    return Trainer(
        cfg,
        model=ToyModel(0),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={"eval": PROMPTS[:4]},
        run_dir=run_dir,
    )


def finished_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights of the finished run's last checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "ckpt-000003" / "adapter.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    build(Path(sys.argv[1])).run(progress=False)

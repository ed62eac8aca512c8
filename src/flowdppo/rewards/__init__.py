"""Reward functions behind one signature, and a registry.

A reward function takes ``(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1])`` and returns a
dict of named components, each a float tensor ``[B]``. The trainer combines components with
``reward.weights`` (a weighted sum, or GDPO over the components) and logs every one separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def shapes_reward() -> RewardFn:
    """The embedded world's exact, rule-based reward: ``strict`` (every atom holds) and ``soft``
    (fraction of atoms that hold), GenEval-style, and ``quality`` (the mean best-template IoU of the
    detected blobs: how cleanly shapes are drawn, a graded signal that needs no prompt)."""
    from flowdppo.worlds import shapes

    def fn(prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        parsed = [shapes.parse_prompt(p) for p in prompts]
        scores = shapes.score_batch(parsed, images.detach().float().cpu())
        return {
            "strict": torch.tensor([s.strict for s in scores], dtype=torch.float32),
            "soft": torch.tensor([s.soft for s in scores], dtype=torch.float32),
            "quality": torch.tensor([s.quality for s in scores], dtype=torch.float32),
        }

    return fn


def http_reward(url: str) -> RewardFn:
    from flowdppo.rewards.http import HTTPReward

    return HTTPReward(url)


REWARDS: dict[str, Callable[..., RewardFn]] = {"shapes": shapes_reward, "http": http_reward}


def build_reward(cfg) -> RewardFn:
    """Build the reward named by ``cfg.name`` (a :class:`flowdppo.config.RewardConfig`)."""
    if cfg.name not in REWARDS:
        raise ValueError(f"unknown reward {cfg.name!r}; valid: {', '.join(REWARDS)}")
    if cfg.name == "http":
        return http_reward(cfg.url)
    return REWARDS[cfg.name]()

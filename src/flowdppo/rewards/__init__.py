"""Reward functions behind one signature, and a registry.

A reward function takes ``(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1])`` and returns a
dict of named components, each a float tensor ``[B]``. The trainer combines components with
``reward.weights`` (a weighted sum, or GDPO over the components) and logs every one separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from flowdppo.registry import Registry, RegistryError


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def shapes_reward() -> RewardFn:
    """The embedded world's exact, rule-based reward: ``strict`` (every atom holds) and ``soft``
    (fraction of atoms that hold), GenEval-style, and ``quality`` (the mean best-template IoU of the
    detected blobs: how cleanly shapes are drawn, a graded signal that needs no prompt), and the graded,
    prompt-aware ``tifa_atom`` / ``tifa_prompt`` (Soft-TIFA-style: the mean and the product of one
    confidence per atom of the prompt, see ``shapes.tifa_score``)."""
    from flowdppo.worlds import shapes

    def fn(prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        parsed = [shapes.parse_prompt(p) for p in prompts]
        scores = shapes.score_batch(parsed, images.detach().float().cpu())
        return {
            "strict": torch.tensor([s.strict for s in scores], dtype=torch.float32),
            "soft": torch.tensor([s.soft for s in scores], dtype=torch.float32),
            "quality": torch.tensor([s.quality for s in scores], dtype=torch.float32),
            # graded, prompt-aware (Soft-TIFA-style): mean / product of per-atom confidences (shapes.tifa_score)
            "tifa_atom": torch.tensor([s.tifa_atom for s in scores], dtype=torch.float32),
            "tifa_prompt": torch.tensor([s.tifa_prompt for s in scores], dtype=torch.float32),
        }

    return fn


def http_reward(url: str | None = None, **kwargs) -> RewardFn:
    """A reward served over HTTP (``flowdppo reward-server``) at ``url`` (``reward.url``)."""
    from flowdppo.rewards.http import HTTPReward

    if not url:
        raise RegistryError("reward.name=http needs reward.url")
    return HTTPReward(url, **kwargs)


shapes_reward.components = (
    "strict",
    "soft",
    "quality",
    "tifa_atom",
    "tifa_prompt",
)  # declared: reward.weights is checked at start

REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward", "reward.name")
REWARDS.register("shapes", shapes_reward)
REWARDS.register("http", http_reward)
# learned and rule-based rewards: lazy entries, imported on first use (heavy dependencies stay optional)
REWARDS.register("pickscore", "flowdppo.rewards.learned:PickScore")
REWARDS.register("clipscore", "flowdppo.rewards.learned:CLIPScore")
REWARDS.register("aesthetic", "flowdppo.rewards.learned:Aesthetic")
REWARDS.register("hpsv2", "flowdppo.rewards.learned:HPSv2")
REWARDS.register("ocr", "flowdppo.rewards.ocr:OCRReward")
REWARDS.register("vqa-judge", "flowdppo.rewards.vqa:VQAJudge")
REWARDS.register("jpeg", "flowdppo.rewards.jpeg:JPEGCompressibility")


def build_reward(cfg, cache: dict | None = None) -> RewardFn:
    """Build the reward named by ``cfg.name`` (a :class:`flowdppo.config.RewardConfig`): a registered name or
    an import path ``package.module:factory``, called with ``cfg.args`` as keyword arguments; or, when
    ``cfg.components`` is set, all of them (:mod:`flowdppo.rewards.multi`, sharing instances via ``cache``)."""
    if getattr(cfg, "components", None):
        from flowdppo.rewards.multi import build_multi

        return build_multi(cfg.components, "reward.components", cache)
    args = dict(cfg.args)
    if cfg.url:
        args.setdefault("url", cfg.url)
    return build_reward_by_name(cfg.name, args, what="reward.args")


def build_reward_by_name(name: str, args: dict | None = None, what: str = "reward args") -> RewardFn:
    """A registered reward name or an import path ``package.module:factory``, called with ``args``
    (``what`` names them in the error when they do not fit)."""
    factory = REWARDS.get(name)
    try:
        return factory(**(args or {}))
    except TypeError as e:
        raise RegistryError(f"{what} do not fit reward {name!r}: {e}") from None


def build_eval_reward(cfg, cache: dict | None = None) -> RewardFn | None:
    """The evaluation reward of ``cfg.eval_components`` (None: evaluate with the training reward)."""
    if not getattr(cfg, "eval_components", None):
        return None
    from flowdppo.rewards.multi import build_multi

    return build_multi(cfg.eval_components, "reward.eval_components", cache)

"""Group-relative advantages (docs/flow-dppo.md, section "Advantages").

All functions take rewards ``[B]`` (or ``[B, K]`` for K rewards) and integer group ids ``[B]`` (the
prompt index of each sample) and return advantages ``[B]``.

- default: ``(R - group mean) / (std over the whole batch + 1e-8)`` (official recipe, Flow-GRPO);
- ``std="group"``: divide by the group's own (population) std;
- :class:`PerPromptStatTracker`: per-prompt statistics kept across iterations (DDPO / Flow-GRPO);
- :func:`gdpo_advantages`: several rewards, each normalised within its group, weighted sum, then
  normalised over the batch.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

import torch

STD_MODES = ("global", "group")


def _check(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if group_ids.dim() != 1 or rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(f"group_ids must be [B]={rewards.shape[0]}, got {list(group_ids.shape)}")


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample group mean and group population std, both ``[B]`` (``rewards`` is ``[B]``)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got {list(rewards.shape)}")
    _check(rewards, group_ids)
    r = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r) / count
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, (r - mean[inv]) ** 2) / count
    return mean[inv].to(rewards.dtype), var.sqrt()[inv].to(rewards.dtype)


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std: str = "global", eps: float = 1e-8, clip: float | None = None
) -> torch.Tensor:
    """``(R - group mean) / (std + eps)`` with the batch-wide (unbiased) or the group std; ``[B]``."""
    if std not in STD_MODES:
        raise ValueError(f"unknown advantage std mode {std!r}; valid: {', '.join(STD_MODES)}")
    mean, gstd = group_stats(rewards, group_ids)
    centred = rewards - mean
    if std == "global":
        scale = rewards.float().std(unbiased=True) if rewards.numel() > 1 else torch.tensor(0.0)
    else:
        scale = gstd
    adv = centred / (scale + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    assert adv.shape == rewards.shape
    return adv


def combine_rewards(rewards: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of ``[B, K]`` rewards -> ``[B]``."""
    if rewards.dim() != 2 or rewards.shape[1] != len(weights):
        raise ValueError(f"rewards must be [B, K] with K={len(weights)} weights, got {list(rewards.shape)}")
    return rewards @ torch.as_tensor(weights, dtype=rewards.dtype)


def gdpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
    clip: float | None = None,
) -> torch.Tensor:
    """GDPO: normalise each of the K rewards within its group (group mean / group std), take the
    weighted sum, then normalise that sum over the batch (mean 0, unbiased std 1). ``[B, K]`` -> ``[B]``."""
    if rewards.dim() != 2:
        raise ValueError(f"GDPO needs rewards [B, K], got {list(rewards.shape)}")
    k = rewards.shape[1]
    weights = [1.0] * k if weights is None else list(weights)
    per = torch.stack([group_advantages(rewards[:, j], group_ids, std="group", eps=eps) for j in range(k)], dim=1)
    total = combine_rewards(per, weights)
    sd = total.std(unbiased=True) if total.numel() > 1 else torch.tensor(0.0)
    adv = (total - total.mean()) / (sd + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def zero_std_group_fraction(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-12) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    _, gstd = group_stats(rewards, group_ids)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    zero = torch.zeros(len(uniq), dtype=torch.bool)
    zero[inv] = gstd <= tol
    return float(zero.float().mean()) if len(uniq) else 0.0


class PerPromptStatTracker:
    """Per-prompt reward statistics across iterations (a buffer of the last ``buffer_size`` rewards).

    ``update(prompts, rewards)`` appends this batch's rewards to each prompt's buffer and returns
    ``(R - prompt mean) / (std + eps)`` where the std is the prompt's own, or the batch's when
    ``global_std`` (Flow-GRPO's setting). The state is a plain dict, so it checkpoints with the run.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, global_std: bool = True, eps: float = 1e-8):
        self.buffer_size, self.min_count, self.global_std, self.eps = buffer_size, min_count, global_std, eps
        self.stats: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        if rewards.dim() != 1 or len(prompts) != rewards.shape[0]:
            raise ValueError(f"need one prompt per reward: {len(prompts)} prompts, rewards {list(rewards.shape)}")
        r = rewards.double()
        adv = torch.empty_like(r)
        batch_std = r.std(unbiased=True) if r.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        for p in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            self.stats[p].extend(r[idx].tolist())
            hist = torch.tensor(list(self.stats[p]), dtype=torch.float64)
            if len(hist) < self.min_count:
                mean, std = r.mean(), batch_std
            else:
                mean = hist.mean()
                std = batch_std if self.global_std else hist.std(unbiased=False)
            adv[idx] = (r[idx] - mean) / (std + self.eps)
        return adv.to(rewards.dtype)

    def state_dict(self) -> dict:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats.clear()
        for k, v in state["stats"].items():
            self.stats[k].extend(v)


def batch_advantages(
    rewards: dict[str, torch.Tensor],
    weights: dict[str, float],
    prompts: Sequence[str],
    group_ids: torch.Tensor,
    std: str = "global",
    clip: float | None = None,
    multi_reward: str = "sum",
    tracker: PerPromptStatTracker | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch's advantages ``[B]`` from named reward components ``[B]`` and their ``weights``.

    GDPO when ``multi_reward == "gdpo"`` and there are several components; else the weighted sum is
    normalised by ``tracker`` (per-prompt statistics across iterations) or within its group. Also returns
    the metrics: each component's and the total's mean, the zero-std group fraction, advantage statistics.
    """
    missing = [k for k in weights if k not in rewards]
    if missing:
        raise ValueError(
            f"reward.weights names {missing[0]!r}, which the reward does not return; valid: {', '.join(rewards)}"
        )
    names = list(weights)
    stacked = torch.stack([rewards[k] for k in names], 1)
    w = [weights[k] for k in names]
    total = combine_rewards(stacked, w)
    if multi_reward == "gdpo" and len(names) > 1:
        adv = gdpo_advantages(stacked, group_ids, w, clip=clip)
    elif tracker is not None:
        adv = tracker.update(prompts, total)
        if clip is not None:
            adv = adv.clamp(-clip, clip)
    else:
        adv = group_advantages(total, group_ids, std=std, clip=clip)
    m = {f"reward/{k}": float(v.mean()) for k, v in rewards.items()}
    m["reward/total"] = float(total.mean())
    m["reward/zero_std_group_frac"] = zero_std_group_fraction(total, group_ids)
    m.update({f"adv/{k}": float(getattr(adv, k)()) for k in ("mean", "std", "min", "max")})
    m["adv/abs_mean"] = float(adv.abs().mean())
    return adv.float(), m

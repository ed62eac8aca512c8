"""Ratio-noise diagnostics: how noisy is the probability ratio that clipping trusts? (docs/flow-dppo.md,
section "Ratio noise")

With ``x' = mean_old + std * eps`` and ``d = mean_new - mean_old`` the exact log-ratio is
``log r = eps.d / std - ||d||^2 / (2 std^2)``: its mean is ``-KL`` and its variance ``2 KL``. With
mean-reduced log-probs over ``n`` latent dims both are divided accordingly: mean ``-KL_mean`` and
variance ``2 KL_mean / n``. :func:`ratio_noise_report` measures these on real transitions, per step
index, next to the prediction, and the fraction a PPO range would clip on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowdppo.core.sde import gaussian_kl, gaussian_log_ratio


@dataclass
class StepNoiseStats:
    step: int
    n: int
    kl_mean: float  # mean of the exact per-sample KL D
    log_r_mean: float  # measured E[log r]
    log_r_mean_pred: float  # -D
    log_r_std: float  # measured std[log r] over samples
    log_r_std_pred: float  # sqrt(2 D) (sum) or sqrt(2 D / n_dims) (mean reduction)
    ratio_mean: float
    ratio_median: float
    clip_low_frac: float  # r < 1 - eps
    clip_high_frac: float  # r > 1 + eps


def ratio_noise_report(
    mean_old: torch.Tensor,
    mean_new: torch.Tensor,
    std: torch.Tensor,
    actions: torch.Tensor,
    clip_eps: float = 0.2,
    reduction: str = "sum",
    step_indices: list[int] | None = None,
) -> list[StepNoiseStats]:
    """Per-step ratio statistics.

    Shapes: ``mean_old``, ``mean_new``, ``actions`` ``[B, S, ...]``; ``std`` ``[B, S]``. ``actions`` are
    the sampled ``x'`` (drawn from the old policy). ``step_indices`` labels the ``S`` columns.
    """
    if not (mean_old.shape == mean_new.shape == actions.shape):
        raise ValueError(
            f"mean_old, mean_new, actions must share a shape, got {list(mean_old.shape)}, "
            f"{list(mean_new.shape)}, {list(actions.shape)}"
        )
    b, s = mean_old.shape[:2]
    if std.shape != (b, s):
        raise ValueError(f"std must be [B, S]=[{b}, {s}], got {list(std.shape)}")
    n_dims = math.prod(mean_old.shape[2:])
    step_indices = list(range(s)) if step_indices is None else list(step_indices)
    out = []
    for j in range(s):
        # from the means (exact to fp32 rounding of the inputs), not as a difference of two log-probs
        log_r = gaussian_log_ratio(actions[:, j], mean_new[:, j], mean_old[:, j], std[:, j], reduction).double()
        kl = gaussian_kl(mean_new[:, j], mean_old[:, j], std[:, j], reduction).double()
        d = float(kl.mean())
        pred_var = 2 * d if reduction == "sum" else 2 * d / n_dims
        r = torch.exp(log_r)
        out.append(
            StepNoiseStats(
                step=step_indices[j],
                n=b,
                kl_mean=d,
                log_r_mean=float(log_r.mean()),
                log_r_mean_pred=-d,
                log_r_std=float(log_r.std(unbiased=True)) if b > 1 else 0.0,
                log_r_std_pred=math.sqrt(pred_var),
                ratio_mean=float(r.mean()),
                ratio_median=float(r.median()),
                clip_low_frac=float((r < 1 - clip_eps).double().mean()),
                clip_high_frac=float((r > 1 + clip_eps).double().mean()),
            )
        )
    return out


def format_report(stats: list[StepNoiseStats]) -> str:
    """A plain-text table of :func:`ratio_noise_report`'s output."""
    cols = [("step", 4), ("KL", 10), ("E[log r]", 10), ("-KL", 10), ("std log r", 10), ("pred", 10), ("med r", 8)]
    head = " ".join(f"{n:>{w}}" for n, w in cols + [("clip<", 6), ("clip>", 6)])
    rows = [head]
    for st in stats:
        rows.append(
            f"{st.step:>4} {st.kl_mean:>10.4g} {st.log_r_mean:>10.4g} {st.log_r_mean_pred:>10.4g} "
            f"{st.log_r_std:>10.4g} {st.log_r_std_pred:>10.4g} {st.ratio_median:>8.4f} "
            f"{st.clip_low_frac:>6.3f} {st.clip_high_frac:>6.3f}"
        )
    return "\n".join(rows)

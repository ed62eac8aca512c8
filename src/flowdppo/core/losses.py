"""Trust regions as pure functions (docs/flow-dppo.md, section "Losses").

Every loss takes per-(sample, step) tensors ``[B, S]`` and returns ``(loss [B, S], metrics)`` where
``metrics`` is a dict of detached 0-d tensors on the loss's device: computing them never waits for the
device. :func:`policy_loss` turns them into python floats in one transfer (:func:`metrics_to_floats`),
or hands the tensors on with ``tensor_metrics=True`` so that a caller can reduce the metrics of a whole
optimizer step and transfer them once. The training objective is the plain mean of the per-element
loss over every entry, masked ones included (:func:`reduce_loss`).

Inputs (:class:`LossInputs`):
- ``logp_new``, ``logp_old``: ``[B, S]`` log-probs of the stored actions (reduced like the kernel);
- ``exact_log_ratio``: ``[B, S]`` ``logp_new - logp_old`` formed from the two means
  (:meth:`flowdppo.core.sde.Kernel.log_ratio`, with gradient through ``mean_new``). When given, every
  loss reads the ratio from it: the difference of two reduced fp32 log-probs loses the small ratio to
  rounding at large latent sizes;
- ``adv``: ``[B]`` advantages, shared by the steps of a sample;
- ``kl``: ``[B, S]`` exact old/new KL of each step (:func:`flowdppo.core.sde.gaussian_kl`), detached;
- ``mean_new``, ``mean_old``: ``[B, S, ...]`` step means (GRPO-Guard only);
- ``std``: ``[B, S]`` transition std from the kernel; ``dt``: ``[B, S]`` ``sigma - sigma_next > 0``;
- ``kl_ref``: ``[B, S]`` KL to the reference policy, with gradient (for ``beta > 0``).

The std is never re-derived here: the caller takes it from the kernel that produced the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flowdppo.core.sde import reduce_latent
from flowdppo.registry import Registry, RegistryError


@dataclass
class LossInputs:
    logp_new: torch.Tensor
    logp_old: torch.Tensor
    adv: torch.Tensor
    kl: torch.Tensor | None = None
    mean_new: torch.Tensor | None = None
    mean_old: torch.Tensor | None = None
    std: torch.Tensor | None = None
    dt: torch.Tensor | None = None
    kl_ref: torch.Tensor | None = None
    exact_log_ratio: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logp_new.dim() != 2:
            raise ValueError(f"logp_new must be [B, S], got {list(self.logp_new.shape)}")
        bs = self.logp_new.shape
        for name in ("logp_old", "kl", "std", "dt", "kl_ref", "exact_log_ratio"):
            t = getattr(self, name)
            if t is not None and t.shape != bs:
                raise ValueError(f"{name} must be [B, S]={list(bs)}, got {list(t.shape)}")
        if self.adv.shape != bs[:1]:
            raise ValueError(f"adv must be [B]={list(bs[:1])}, got {list(self.adv.shape)}")
        for name in ("mean_new", "mean_old"):
            t = getattr(self, name)
            if t is not None and t.shape[:2] != bs:
                raise ValueError(f"{name} must be [B, S, ...] with [B, S]={list(bs)}, got {list(t.shape)}")

    @property
    def log_ratio(self) -> torch.Tensor:
        """``log r`` with gradient: ``exact_log_ratio`` when given, else ``logp_new - logp_old``."""
        if self.exact_log_ratio is not None:
            return self.exact_log_ratio
        return self.logp_new - self.logp_old.detach()

    def adv_bs(self, clip: float | None = None) -> torch.Tensor:
        """Advantages broadcast to ``[B, S]``, detached, optionally clipped to ``[-clip, clip]``."""
        a = self.adv.detach().float()
        if clip is not None:
            a = a.clamp(-clip, clip)
        return a[:, None].expand_as(self.logp_new)


Metrics = dict[str, torch.Tensor]


def _f(x: torch.Tensor) -> torch.Tensor:
    """A metric: detached fp32 0-d tensor, no host sync (NaN for an empty reduction)."""
    x = x.detach().float()
    return x if x.numel() else torch.full((), float("nan"), device=x.device)


def _frac(mask: torch.Tensor) -> torch.Tensor:
    return _f(mask.float().mean())


def metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Python floats from tensor (or float) metrics, with one device-to-host transfer for all of them."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, stacked))
    return {k: out[k] for k in metrics}


def ratio_metrics(ratio: torch.Tensor, kl: torch.Tensor | None, delta: float | None = None) -> Metrics:
    """Ratio mean/std/min/max and D mean/max (+ fraction with ``D > delta``)."""
    r = ratio.detach().float()
    m = {
        "ratio_mean": _f(r.mean()),
        "ratio_std": _f(r.std(unbiased=False)),
        "ratio_min": _f(r.min()),
        "ratio_max": _f(r.max()),
        "log_ratio_mean": _f(torch.log(r.clamp_min(1e-30)).mean()),
    }
    if kl is not None:
        k = kl.detach().float()
        m["kl_mean"] = _f(k.mean())
        m["kl_max"] = _f(k.max())
        if delta is not None:
            m["kl_above_delta_frac"] = _frac(k > delta)
    return m


def _masked_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``-A r`` where kept, an exact 0 (value and gradient) where masked.

    The log-ratio is zeroed in masked entries *before* ``exp`` so an overflowing ratio there never
    meets a zero in the backward pass (``inf * 0 = NaN``).
    """
    safe = torch.where(masked, torch.zeros_like(log_ratio), log_ratio)
    return torch.where(masked, torch.zeros_like(log_ratio), -adv * torch.exp(safe))


def flow_dppo_loss(inp: LossInputs, delta: float) -> tuple[torch.Tensor, Metrics]:
    """Flow-DPPO: ``-M * A * r`` with ``M = 0`` iff ``D > delta`` and the step moves away in A's direction.

    Corrective moves (``A > 0, r < 1`` or ``A < 0, r > 1``) are never masked; neither are ``A = 0`` or
    ``r = 1``. No ratio clip and no advantage clip. Masked entries are exact zeros (``where``), so an
    ``inf`` ratio there yields neither NaN nor gradient.
    """
    if inp.kl is None:
        raise ValueError("flow-dppo needs the old/new KL (LossInputs.kl)")
    log_ratio = inp.log_ratio
    adv = inp.adv_bs()
    high = inp.kl.detach() > delta
    lr = log_ratio.detach()
    pos_rm = high & (adv > 0) & (lr > 0)
    neg_rm = high & (adv < 0) & (lr < 0)
    masked = pos_rm | neg_rm
    loss = _masked_surrogate(log_ratio, adv, masked)
    m = ratio_metrics(torch.exp(lr), inp.kl, delta)
    m.update(masked_frac=_frac(masked), masked_pos_adv_frac=_frac(pos_rm), masked_neg_adv_frac=_frac(neg_rm))
    return loss, m


def dppo_symmetric_loss(inp: LossInputs, delta: float) -> tuple[torch.Tensor, Metrics]:
    """Ablation: mask every entry with ``D > delta`` whatever its direction ("w/o asymmetry")."""
    if inp.kl is None:
        raise ValueError("dppo-symmetric needs the old/new KL (LossInputs.kl)")
    adv = inp.adv_bs()
    masked = inp.kl.detach() > delta
    loss = _masked_surrogate(inp.log_ratio, adv, masked)
    m = ratio_metrics(torch.exp(inp.log_ratio.detach()), inp.kl, delta)
    m.update(
        masked_frac=_frac(masked),
        masked_pos_adv_frac=_frac(masked & (adv > 0)),
        masked_neg_adv_frac=_frac(masked & (adv < 0)),
    )
    return loss, m


def _ppo_clip(ratio: torch.Tensor, adv: torch.Tensor, eps: float) -> tuple[torch.Tensor, Metrics]:
    """``-min(r A, clip(r, 1-eps, 1+eps) A)`` elementwise, with clip fractions by side."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
    loss = torch.maximum(unclipped, clipped)
    r = ratio.detach()
    # An entry is "clipped" when the clipped branch is the active one and differs: no gradient flows.
    hi = (r > 1 + eps) & (adv > 0)
    lo = (r < 1 - eps) & (adv < 0)
    return loss, {
        "clip_frac": _frac(hi | lo),
        "clip_high_frac": _frac(hi),
        "clip_low_frac": _frac(lo),
        "outside_range_high_frac": _frac(r > 1 + eps),
        "outside_range_low_frac": _frac(r < 1 - eps),
    }


def ppo_clip_loss(inp: LossInputs, eps: float, adv_clip: float | None = 5.0) -> tuple[torch.Tensor, Metrics]:
    """Flow-GRPO / Flow-CPS: PPO clip on the step ratio, advantages clipped to ``+-adv_clip``."""
    ratio = torch.exp(inp.log_ratio)
    loss, m = _ppo_clip(ratio, inp.adv_bs(adv_clip), eps)
    m.update(ratio_metrics(ratio, inp.kl))
    return loss, m


def guard_bias(mean_new: torch.Tensor, mean_old: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's RatioNorm bias ``b = mean((mean_new - mean_old)^2) / (2 s^2)``, ``[B, S]``.

    It equals ``-E[log r]`` for mean-reduced log-probs; gradient flows through ``mean_new`` as in the
    public implementations.
    """
    b, s = mean_new.shape[:2]
    d2 = (mean_new.float() - mean_old.detach().float()) ** 2
    per = reduce_latent(d2.reshape(b * s, *d2.shape[2:]), "mean").view(b, s)
    return per / (2 * std.float() ** 2)


def grpo_guard_loss(inp: LossInputs, eps: float, adv_clip: float | None = 5.0) -> tuple[torch.Tensor, Metrics]:
    """GRPO-Guard: PPO clip on ``r~ = exp((log r + b) * s)``, then the per-step loss divided by ``-dt``.

    ``s`` is the transition std of the step (the public code collapses it to one scalar per batch;
    here each step keeps its own, which is the same within a step index since sigma is shared).
    """
    for name in ("mean_new", "mean_old", "std", "dt"):
        if getattr(inp, name) is None:
            raise ValueError(f"grpo-guard needs LossInputs.{name}")
    std = inp.std.float()
    bias = guard_bias(inp.mean_new, inp.mean_old, std)
    ratio_t = torch.exp((inp.log_ratio + bias) * std)
    loss, m = _ppo_clip(ratio_t, inp.adv_bs(adv_clip), eps)
    loss = loss / inp.dt.float()
    m.update(ratio_metrics(torch.exp(inp.log_ratio), inp.kl))
    m.update(
        guard_ratio_mean=_f(ratio_t.mean()),
        guard_log_ratio_mean=_f(torch.log(ratio_t.detach()).mean()),
        guard_bias_mean=_f(bias.mean()),
    )
    return loss, m


def unclipped_loss(inp: LossInputs) -> tuple[torch.Tensor, Metrics]:
    """Ablation: plain ``-A r`` (no trust region)."""
    ratio = torch.exp(inp.log_ratio)
    m = ratio_metrics(ratio, inp.kl)
    return -inp.adv_bs() * ratio, m


LossFn = Callable[[LossInputs, "LossSpec"], tuple[torch.Tensor, Mapping[str, Any]]]


@dataclass(frozen=True)
class TrustRegion:
    """A trust-region loss and what it declares it needs; the trainer reads the declaration.

    - ``fn(inputs, spec) -> (loss [B, S], metrics)``: the pure loss;
    - ``needs_means``: the step means ``mean_new`` / ``mean_old`` are carried to the loss (GRPO-Guard);
    - ``needs_reference``: a reference-policy forward on every training step, whatever ``beta``;
    - ``uses``: the ``algorithm.*`` knobs it reads (``delta``, ``clip_eps``, ``loss_adv_clip``, ...);
      a knob set away from its default that no part of the chosen setting uses gets a warning;
    - ``multi_update``: safe for several optimizer steps per batch (``train.inner_epochs > 1``).
    """

    fn: LossFn
    needs_means: bool = False
    needs_reference: bool = False
    uses: tuple[str, ...] = ()
    multi_update: bool = True


def _check_trust_region(obj: Any, name: str) -> TrustRegion:
    if isinstance(obj, TrustRegion):
        return obj
    if callable(obj):  # a bare ``fn(inputs, spec)``: no declared needs
        return TrustRegion(fn=obj)
    raise RegistryError(f"algorithm.loss: {name!r} is a {type(obj).__name__}, not a TrustRegion or a function")


LOSSES: Registry[TrustRegion] = Registry("trust region", "algorithm.loss", check=_check_trust_region)
LOSSES.register("flow-dppo", TrustRegion(lambda i, s: flow_dppo_loss(i, s.delta), uses=("delta",)))
LOSSES.register("dppo-symmetric", TrustRegion(lambda i, s: dppo_symmetric_loss(i, s.delta), uses=("delta",)))
LOSSES.register(
    "clip", TrustRegion(lambda i, s: ppo_clip_loss(i, s.clip_eps, s.loss_adv_clip), uses=("clip_eps", "loss_adv_clip"))
)
LOSSES.register(
    "grpo-guard",
    TrustRegion(
        lambda i, s: grpo_guard_loss(i, s.clip_eps, s.loss_adv_clip),
        needs_means=True,
        uses=("clip_eps", "loss_adv_clip"),
    ),
)
LOSSES.register("unclipped", TrustRegion(lambda i, s: unclipped_loss(i)))


@dataclass(frozen=True)
class LossSpec:
    """Which trust region (a registered name or an import path) and its knobs.

    ``args`` holds extra keyword arguments for a user's own trust region (``algorithm.loss_args``).
    """

    name: str = "flow-dppo"
    delta: float = 1e-5
    clip_eps: float = 1e-4
    loss_adv_clip: float | None = 5.0
    beta: float = 0.0
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        LOSSES.get(self.name)  # an unknown name fails here, listing the registered ones
        if self.delta < 0 or self.clip_eps <= 0 or self.beta < 0:
            raise ValueError("delta and beta must be >= 0 and clip_eps > 0")

    @property
    def trust_region(self) -> TrustRegion:
        return LOSSES.get(self.name)

    @property
    def needs_means(self) -> bool:
        return self.trust_region.needs_means

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0 or self.trust_region.needs_reference


def policy_loss(
    inp: LossInputs, spec: LossSpec, *, tensor_metrics: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The chosen trust-region loss plus ``beta * KL_ref``: per-element ``[B, S]`` and metrics.

    Metrics are python floats (one transfer for all), or detached 0-d tensors with ``tensor_metrics=True``
    (no host sync: the training step's call).
    """
    loss, m = spec.trust_region.fn(inp, spec)
    m = dict(m)
    assert loss.shape == inp.logp_new.shape, (loss.shape, inp.logp_new.shape)
    m["policy_loss"] = _f(loss.mean())
    if inp.kl_ref is not None:
        m["kl_ref"] = _f(inp.kl_ref.mean())
        if spec.beta > 0:
            loss = loss + spec.beta * inp.kl_ref
    elif spec.beta > 0:
        raise ValueError("beta > 0 needs the reference KL (LossInputs.kl_ref)")
    return loss, (m if tensor_metrics else metrics_to_floats(m))


def reduce_loss(loss: torch.Tensor, n_entries: int | None = None) -> torch.Tensor:
    """The training objective: the sum of the per-element loss ``[B, S]`` over ``n_entries``, masked
    entries included. ``n_entries`` defaults to ``B * S`` (the mean); the trainer passes the whole
    mini-batch's count when it back-propagates one step of one micro-batch at a time, so the summed
    gradients are those of the mean over the mini-batch on any number of processes."""
    if loss.dim() != 2:
        raise ValueError(f"per-element loss must be [B, S], got {list(loss.shape)}")
    return loss.sum() / (loss.numel() if n_entries is None else n_entries)

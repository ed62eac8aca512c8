"""Sigma schedules, per-step transition kernels and the exact Gaussian divergence (docs/flow-dppo.md,
sections "The MDP", "Transition kernels" and "Exact KL").

Every denoising step of a flow model is a Gaussian policy ``N(mean(x_k), std_k^2 I)``. This module
owns the three facts the rest of the package needs about it and nowhere else re-derives them:

- the sigma schedule (:func:`diffusers_sigmas`, :func:`uniform_shift_sigmas`);
- one kernel per sampler (:func:`flow_sde_step`, :func:`cps_step`, :func:`dance_step`,
  :func:`ode_step`): ``prev_sample=None`` samples, a given ``prev_sample`` replays (scores the stored
  transition and draws nothing); both paths run the same lines;
- the transition std (:func:`transition_std`) and the exact KL between two policies of one step
  (:func:`gaussian_kl`), reduced like the log-prob;
- the log-ratio of two policies of one step on a stored action (:func:`gaussian_log_ratio`), formed
  from the two means rather than as a difference of two log-probs (which loses the small difference
  to the rounding of two large reductions).

Shapes: latents ``x``, ``v``, ``mean``, ``prev_sample`` are ``[B, ...]`` (normally ``[B, C, H, W]``);
``sigma`` / ``sigma_next`` are python floats, 0-d tensors or ``[B]`` tensors; ``std``, ``log_prob`` and
``kl`` are ``[B]``. All maths is fp32 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flowdppo.registry import Registry, RegistryError

REDUCTIONS = ("mean", "sum")
CPS_LOGPROBS = ("gaussian", "unnormalized")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def uniform_shift_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3 static shift ``s*t / (1 + (s-1)*t)`` of ``linspace(1, 0, N+1)`` (official Flow-DPPO code).

    Returns fp32 ``[N+1]``, 1 -> 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1.0 + (shift - 1.0) * t)).to(torch.float32)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent ``mu`` of the dynamic shift (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def diffusers_sigmas(
    num_steps: int,
    scheduler_config: Mapping[str, Any] | None = None,
    *,
    mu: float | None = None,
    base_sigmas: Any = None,
) -> torch.Tensor:
    """The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)``.

    Re-implemented from the scheduler's definition (no diffusers import) so that replay never needs
    a stateful scheduler. ``scheduler_config`` is the scheduler's config dict (keys absent take the
    scheduler's defaults). ``mu`` is required when the config uses dynamic shifting (FLUX; see
    :func:`flux_mu`). ``base_sigmas`` passes custom sigmas as a pipeline does (FLUX pipelines pass
    ``linspace(1, 1/N, N)``), before shifting. Returns fp32 ``[N+1]`` ending in 0.
    """
    cfg = dict(scheduler_config or {})
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if cfg.get(key):
            raise NotImplementedError(
                f"scheduler option {key}=True is not supported by flowdppo's diffusers schedule; "
                "supported: shift, use_dynamic_shifting (+mu), time_shift_type, shift_terminal"
            )
    n_train = int(cfg.get("num_train_timesteps", 1000))
    shift = float(cfg.get("shift", 1.0))
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    shift_type = cfg.get("time_shift_type", "exponential")
    shift_terminal = cfg.get("shift_terminal")
    if shift_type not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {shift_type!r}")
    if dynamic and mu is None:
        raise ValueError("this scheduler config uses dynamic shifting: pass mu (see flowdppo.core.sde.flux_mu)")

    def static(s: torch.Tensor) -> torch.Tensor:
        return shift * s / (1 + (shift - 1) * s)

    # The scheduler's training sigmas (float32, as diffusers builds them) give sigma_max / sigma_min.
    train_t = torch.linspace(1, n_train, n_train, dtype=torch.float32).flip(0)
    train_sigmas = train_t / n_train
    if not dynamic:
        train_sigmas = static(train_sigmas)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])

    if base_sigmas is None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        s = torch.linspace(sigma_max * n_train, sigma_min * n_train, num_steps, dtype=torch.float64) / n_train
    else:
        s = torch.as_tensor(base_sigmas, dtype=torch.float32).to(torch.float64)
    if dynamic:
        if shift_type == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        else:
            s = mu / (mu + (1 / s - 1))
    else:
        s = static(s)
    if shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    s = s.to(torch.float32)
    return torch.cat([s, torch.zeros(1, dtype=torch.float32)])


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What one transition returns. ``std`` and ``log_prob`` are ``[B]``; ``log_prob`` is None for ODE steps."""

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def sigma_batch(value: Any, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A float / 0-d / ``[B]`` sigma as an fp32 ``[B]`` tensor on ``device`` (the one sigma-to-batch helper)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape [B]=[{batch}], got {tuple(t.shape)}")
    return t


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` to broadcast against ``like`` ``[B, ...]``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def reduce_latent(t: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``[B, ...]`` over every non-batch dim to ``[B]`` (``"mean"`` or ``"sum"``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    dims = tuple(range(1, t.dim()))
    if not dims:
        return t
    out = t.mean(dim=dims) if reduction == "mean" else t.sum(dim=dims)
    assert out.shape == t.shape[:1], (out.shape, t.shape)
    return out


def flow_sde_coefficient(sigma: torch.Tensor, eta: float, sigma_max: float | None) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient ``a = eta * sqrt(sigma / (1 - sigma'))`` (``[B]``).

    ``sigma' = sigma_max`` (the schedule's ``sigmas[1]``) where ``sigma == 1``, else ``sigma``.
    """
    at_one = sigma >= 1.0
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError("a step at sigma = 1 needs sigma_max (the schedule's sigmas[1]) for the Flow-SDE std")
        if not (0.0 <= sigma_max < 1.0):
            raise ValueError(f"sigma_max must be in [0, 1), got {sigma_max}")
    denom_sigma = torch.where(at_one, torch.full_like(sigma, sigma_max if sigma_max is not None else 0.0), sigma)
    return eta * torch.sqrt(sigma / (1.0 - denom_sigma))


def transition_std(
    sampler: str,
    sigma: Any,
    sigma_next: Any,
    eta: float,
    *,
    sigma_max: float | None = None,
    batch: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The std of a sampler's transition at one step, fp32 ``[B]`` (``[1]`` if ``batch`` is None and sigma is scalar).

    The one place the std is defined: the kernels sample with it, the log-prob and the KL divide by it.
    """
    spec = SAMPLERS.get(sampler)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if batch is None:
        batch = 1 if s.dim() == 0 else s.shape[0]
    s = sigma_batch(s, batch, s.device)
    sn = sigma_batch(sigma_next, batch, s.device)
    if bool((sn >= s).any()):
        raise ValueError("sigma_next must be smaller than sigma (generation runs from 1 to 0)")
    if not spec.stochastic or eta == 0:
        return torch.zeros_like(s)
    return spec.std(s, sn, float(eta), sigma_max)


def _flow_sde_std(s: torch.Tensor, sn: torch.Tensor, eta: float, sigma_max: float | None) -> torch.Tensor:
    return flow_sde_coefficient(s, eta, sigma_max) * torch.sqrt(s - sn)


def _dance_std(s: torch.Tensor, sn: torch.Tensor, eta: float, sigma_max: float | None) -> torch.Tensor:
    return eta * torch.sqrt(s - sn)


def _cps_std(s: torch.Tensor, sn: torch.Tensor, eta: float, sigma_max: float | None) -> torch.Tensor:
    return sn * math.sin(eta * math.pi / 2)


def gaussian_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Log-density of ``sample`` under ``N(mean, std^2 I)`` reduced over latent dims: ``[B]``.

    ``std`` is ``[B]``. With ``"mean"`` this is the per-dimension average log-density (Flow-GRPO and
    the official code); with ``"sum"`` the exact multivariate density.
    """
    sample, mean = sample.float(), mean.float()
    s = _bcast(std.float(), sample)
    elem = -((sample - mean) ** 2) / (2 * s**2) - torch.log(s) - _LOG_SQRT_2PI
    return reduce_latent(elem, reduction)


def gaussian_kl(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Exact KL between ``N(mean_a, std^2 I)`` and ``N(mean_b, std^2 I)``: ``||a - b||^2 / (2 std^2)``, ``[B]``.

    Equal covariances make it symmetric. ``reduction="mean"`` divides by the latent size (the
    official code's normalisation, docs/flow-dppo.md, section "Exact KL"). fp32 whatever the input dtype.
    """
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"means disagree in shape: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}")
    if std.shape != mean_a.shape[:1]:
        raise ValueError(f"std must be [B]={list(mean_a.shape[:1])}, got {list(std.shape)}")
    d = mean_a.float() - mean_b.float()
    return reduce_latent(d**2, reduction) / (2 * std.float() ** 2)


def gaussian_log_ratio(
    sample: torch.Tensor,
    mean_new: torch.Tensor,
    mean_old: torch.Tensor,
    std: torch.Tensor,
    reduction: str = "mean",
    *,
    unnormalized: bool = False,
) -> torch.Tensor:
    """``log N(x'; mean_new, s^2) - log N(x'; mean_old, s^2)`` from the means, reduced like the log-prob: ``[B]``.

    Equal stds cancel the normalisers, leaving
    ``((mean_new - mean_old) . ((x' - mean_old) + (x' - mean_new))) / (2 s^2)`` reduced over the latent
    dims. Each term is formed from differences of nearby values, so the result keeps its relative
    precision however many dims are reduced; the difference of two reduced log-probs does not (each is
    an O(n) sum in fp32 whose rounding is of the size of the ratio's own spread at large ``n``). The
    gradient with respect to ``mean_new`` is the log-prob's, ``(x' - mean_new) / s^2``.
    ``unnormalized=True`` matches the ``-(x' - mean)^2`` log-prob of ``cps_logprob="unnormalized"``
    (no division by ``2 s^2``). fp32 whatever the input dtype; ``std`` is ``[B]``.
    """
    if not (sample.shape == mean_new.shape == mean_old.shape):
        raise ValueError(
            f"sample, mean_new, mean_old must share a shape, got {tuple(sample.shape)}, "
            f"{tuple(mean_new.shape)}, {tuple(mean_old.shape)}"
        )
    if std.shape != sample.shape[:1]:
        raise ValueError(f"std must be [B]={list(sample.shape[:1])}, got {list(std.shape)}")
    x, m_new, m_old = sample.float(), mean_new.float(), mean_old.float()
    elem = (m_new - m_old) * ((x - m_old) + (x - m_new))
    out = reduce_latent(elem, reduction)
    return out if unnormalized else out / (2 * std.float() ** 2)


def _finish(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
    reduction: str,
    unnormalized: bool = False,
) -> StepOutput:
    """Sample (or take ``prev_sample``) and score it. Shared tail of every stochastic kernel."""
    if bool((std <= 0).any()):
        raise ValueError("this transition has zero std (e.g. CPS with sigma_next = 0): run it as an ODE step")
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        x_next = mean + _bcast(std, mean) * noise.float()
    else:
        if prev_sample.shape != mean.shape:
            raise ValueError(f"prev_sample must have shape {tuple(mean.shape)}, got {tuple(prev_sample.shape)}")
        x_next = prev_sample.float()
    if unnormalized:
        log_prob = reduce_latent(-((x_next.detach() - mean) ** 2), reduction)
    else:
        log_prob = gaussian_log_prob(x_next.detach(), mean, std, reduction)
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=log_prob)


def _prepare(v: torch.Tensor, x: torch.Tensor, sigma: Any, sigma_next: Any):
    if v.shape != x.shape:
        raise ValueError(f"velocity and latent disagree in shape: {tuple(v.shape)} vs {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"latents must be [B, ...], got shape {tuple(x.shape)}")
    b = x.shape[0]
    s = sigma_batch(sigma, b, x.device)
    sn = sigma_batch(sigma_next, b, x.device)
    return v.float(), x.float(), s, sn


def ode_step(v: torch.Tensor, x: torch.Tensor, sigma: Any, sigma_next: Any) -> StepOutput:
    """Plain Euler ODE step ``x + (sigma_next - sigma) v``; std 0 and no log-prob."""
    v, x, s, sn = _prepare(v, x, sigma, sigma_next)
    x_next = x + _bcast(sn - s, x) * v
    return StepOutput(x_next=x_next, mean=x_next, std=torch.zeros_like(s), log_prob=None)


def _sde_mean(v: torch.Tensor, x: torch.Tensor, s: torch.Tensor, sn: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Mean of the Flow-SDE Euler-Maruyama step with diffusion coefficient ``a`` (``[B]``)."""
    dt = _bcast(sn - s, x)
    s_, a_ = _bcast(s, x), _bcast(a, x)
    return x * (1 + a_**2 / (2 * s_) * dt) + v * (1 + a_**2 * (1 - s_) / (2 * s_)) * dt


def flow_sde_step(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: Any,
    sigma_next: Any,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    *,
    sigma_max: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """Flow-GRPO's SDE step. ``sigma_max`` (= ``sigmas[1]``) is needed only for a step at sigma = 1."""
    if eta == 0:
        return ode_step(v, x, sigma, sigma_next)
    v, x, s, sn = _prepare(v, x, sigma, sigma_next)
    a = flow_sde_coefficient(s, eta, sigma_max)
    mean = _sde_mean(v, x, s, sn, a)
    std = transition_std("flow-sde", s, sn, eta, sigma_max=sigma_max, device=x.device)
    return _finish(mean, std, prev_sample, generator, noise, reduction)


def dance_step(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: Any,
    sigma_next: Any,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    *,
    sigma_max: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """DanceGRPO's SDE step: the Flow-SDE mean with a constant coefficient ``a = eta``."""
    if eta == 0:
        return ode_step(v, x, sigma, sigma_next)
    v, x, s, sn = _prepare(v, x, sigma, sigma_next)
    mean = _sde_mean(v, x, s, sn, torch.full_like(s, float(eta)))
    std = transition_std("dance", s, sn, eta, device=x.device)
    return _finish(mean, std, prev_sample, generator, noise, reduction)


def cps_step(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: Any,
    sigma_next: Any,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    *,
    sigma_max: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
    cps_logprob: str = "gaussian",
) -> StepOutput:
    """Coefficients-preserving sampling: ``mean = (1-s') x0_hat + s' cos(eta pi/2) x1_hat``, ``std = s' sin(eta pi/2)``.

    ``cps_logprob="unnormalized"`` gives the official CPS code's ``-(x' - mean)^2`` (baseline parity
    only); the KL always uses the Gaussian std.
    """
    if cps_logprob not in CPS_LOGPROBS:
        raise ValueError(f"unknown cps_logprob {cps_logprob!r}; valid: {', '.join(CPS_LOGPROBS)}")
    if eta == 0:
        return ode_step(v, x, sigma, sigma_next)
    v, x, s, sn = _prepare(v, x, sigma, sigma_next)
    s_, sn_ = _bcast(s, x), _bcast(sn, x)
    x0_hat = x - s_ * v
    x1_hat = x + (1 - s_) * v
    mean = (1 - sn_) * x0_hat + sn_ * math.cos(eta * math.pi / 2) * x1_hat
    std = transition_std("cps", s, sn, eta, device=x.device)
    return _finish(mean, std, prev_sample, generator, noise, reduction, unnormalized=cps_logprob == "unnormalized")


@dataclass(frozen=True)
class Kernel:
    """A sampler with its options bound, so rollout, replay and the losses share one definition.

    ``sigma_max`` is the schedule's ``sigmas[1]`` (Flow-SDE std at sigma = 1).
    """

    sampler: str = "flow-sde"
    eta: float = 0.7
    sigma_max: float | None = None
    logprob_reduction: str = "mean"
    cps_logprob: str = "gaussian"

    def __post_init__(self) -> None:
        SAMPLERS.get(self.sampler)  # a clear error naming the registered samplers
        if self.logprob_reduction not in REDUCTIONS:
            raise ValueError(f"unknown logprob_reduction {self.logprob_reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if self.cps_logprob not in CPS_LOGPROBS:
            raise ValueError(f"unknown cps_logprob {self.cps_logprob!r}; valid: {', '.join(CPS_LOGPROBS)}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @staticmethod
    def for_schedule(sigmas: torch.Tensor, **kwargs: Any) -> Kernel:
        """A kernel whose ``sigma_max`` is ``sigmas[1]`` of this schedule."""
        return Kernel(sigma_max=float(sigmas[1]) if len(sigmas) > 1 else None, **kwargs)

    def step(
        self,
        v: torch.Tensor,
        x: torch.Tensor,
        sigma: Any,
        sigma_next: Any,
        prev_sample: torch.Tensor | None = None,
        *,
        stochastic: bool = True,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One transition; ``stochastic=False`` (or eta 0 / the ODE sampler) gives the Euler ODE step."""
        spec = SAMPLERS.get(self.sampler)
        if not stochastic or self.eta == 0 or not spec.stochastic:
            return ode_step(v, x, sigma, sigma_next)
        options = {k: getattr(self, k) for k in spec.options}
        return spec.step(
            v,
            x,
            sigma,
            sigma_next,
            self.eta,
            prev_sample,
            sigma_max=self.sigma_max,
            generator=generator,
            noise=noise,
            reduction=self.logprob_reduction,
            **options,
        )

    def std(
        self, sigma: Any, sigma_next: Any, batch: int | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return transition_std(
            self.sampler, sigma, sigma_next, self.eta, sigma_max=self.sigma_max, batch=batch, device=device
        )

    def kl(self, mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Exact KL of one step under this kernel's std and reduction, ``[B]``."""
        return gaussian_kl(mean_a, mean_b, std, self.logprob_reduction)

    def log_ratio(
        self, sample: torch.Tensor, mean_new: torch.Tensor, mean_old: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """``logp_new - logp_old`` of the stored action ``sample`` under this kernel's log-prob, from the
        means (the sampler's ``log_ratio``, by default :func:`gaussian_log_ratio`), ``[B]``. The one place
        the losses and the analyses get it."""
        spec = SAMPLERS.get(self.sampler)
        options = {k: getattr(self, k) for k in spec.options}
        return spec.log_ratio(sample, mean_new, mean_old, std, self.logprob_reduction, **options)


# --------------------------------------------------------------------------------------------
# The sampler registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """A transition kernel family, as :class:`Kernel` uses it for sampling, replay and the KL.

    - ``step(v, x, sigma, sigma_next, eta, prev_sample, *, sigma_max, generator, noise, reduction,
      **options) -> StepOutput``: one transition; ``prev_sample=None`` samples, else replays;
    - ``std(sigma [B], sigma_next [B], eta, sigma_max) -> [B]``: its transition std (the one
      definition: the step, the log-prob and the KL all use it through :func:`transition_std`);
    - ``options``: the :class:`Kernel` fields passed on to ``step`` as keyword arguments
      (e.g. ``("cps_logprob",)``);
    - ``stochastic=False`` marks a deterministic sampler (``ode``): every step is the Euler step;
    - ``log_ratio(sample, mean_new, mean_old, std, reduction, **options) -> [B]``: ``logp_new - logp_old``
      of a stored action formed from the two means; the default, :func:`gaussian_log_ratio`, is right
      for every step whose log-prob is the Gaussian one of ``_finish``.
    """

    step: Callable[..., StepOutput]
    std: Callable[[torch.Tensor, torch.Tensor, float, float | None], torch.Tensor]
    options: tuple[str, ...] = ()
    stochastic: bool = True
    log_ratio: Callable[..., torch.Tensor] = gaussian_log_ratio


def _check_sampler(obj: Any, name: str) -> Sampler:
    if not isinstance(obj, Sampler):
        raise RegistryError(f"sampling.sampler: {name!r} is a {type(obj).__name__}, not a flowdppo.core.sde.Sampler")
    return obj


def _no_std(s: torch.Tensor, sn: torch.Tensor, eta: float, sigma_max: float | None) -> torch.Tensor:
    return torch.zeros_like(s)


SAMPLERS: Registry[Sampler] = Registry("sampler", "sampling.sampler", check=_check_sampler)
SAMPLERS.register("flow-sde", Sampler(step=flow_sde_step, std=_flow_sde_std))


def _cps_log_ratio(sample, mean_new, mean_old, std, reduction="mean", cps_logprob="gaussian"):
    return gaussian_log_ratio(sample, mean_new, mean_old, std, reduction, unnormalized=cps_logprob == "unnormalized")


SAMPLERS.register("cps", Sampler(step=cps_step, std=_cps_std, options=("cps_logprob",), log_ratio=_cps_log_ratio))
SAMPLERS.register("dance", Sampler(step=dance_step, std=_dance_std))
SAMPLERS.register(
    "ode", Sampler(step=lambda v, x, s, sn, *a, **k: ode_step(v, x, s, sn), std=_no_std, stochastic=False)
)

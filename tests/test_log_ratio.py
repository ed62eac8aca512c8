"""The log-ratio formed from the two means (flowdppo.core.sde.gaussian_log_ratio) against float64."""

import math

import pytest
import torch

from flowdppo.core.sde import Kernel, gaussian_log_prob, gaussian_log_ratio

LATENT = (16, 64, 64)  # 65,536 dims: SD3.5 latents at 512^2


def _case(kl_mean: float, std: float, batch: int = 32, seed: int = 0):
    """fp32 inputs (old/new means, an action drawn from the old policy) with a given mean-reduced KL."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(LATENT)
    mean_old = torch.randn(batch, *LATENT, generator=g)
    direction = torch.randn(batch, *LATENT, generator=g)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    mean_new = mean_old + direction * (std * math.sqrt(2 * kl_mean * n))
    action = mean_old + std * torch.randn(batch, *LATENT, generator=g)
    return action, mean_new, mean_old, torch.full((batch,), std)


def _exact(action, mean_new, mean_old, std, reduction):
    """The log-ratio of these very fp32 inputs, computed in float64."""
    x, mn, mo, s = action.double(), mean_new.double(), mean_old.double(), std.double().view(-1, 1, 1, 1)
    elem = ((x - mo) ** 2 - (x - mn) ** 2) / (2 * s**2)
    return elem.flatten(1).mean(1) if reduction == "mean" else elem.flatten(1).sum(1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_ratio_from_means_is_exact_at_65536_dims(reduction):
    # a small step (mean-reduced KL 1e-8, late-step std 0.05): where the trust regions decide
    action, mean_new, mean_old, std = _case(1e-8, 0.05)
    exact = _exact(action, mean_new, mean_old, std, reduction)
    spread = float(exact.std())
    old = gaussian_log_prob(action, mean_new, std, reduction) - gaussian_log_prob(action, mean_old, std, reduction)
    new = gaussian_log_ratio(action, mean_new, mean_old, std, reduction)
    assert new.dtype == torch.float32 and new.shape == (32,)
    err_old = float((old.double() - exact).abs().max()) / spread
    err_new = float((new.double() - exact).abs().max()) / spread
    # measured: old ~0.3-0.5 of std[log r] (max over 32 samples), new ~5e-7
    assert err_new < 1e-4, err_new
    assert err_old > 0.05, err_old  # the difference of two fp32 reductions really is that bad here
    assert err_old > 1000 * err_new
    # the sign, which the Flow-DPPO mask and the clip side read, is right for every sample
    assert torch.equal(new > 0, exact > 0)


def test_log_ratio_gradient_is_the_log_prob_gradient():
    g = torch.Generator().manual_seed(1)
    x, mo = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g).double()
    std = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    mn_a = (mo + 0.1 * torch.randn(3, 2, 4, 4, generator=g).double()).requires_grad_(True)
    mn_b = mn_a.detach().clone().requires_grad_(True)
    gaussian_log_ratio(x, mn_a, mo, std, "mean").sum().backward()
    gaussian_log_prob(x, mn_b, std, "mean").sum().backward()
    assert torch.allclose(mn_a.grad, mn_b.grad, atol=1e-5)


@pytest.mark.parametrize(
    "sampler,cps_logprob", [("flow-sde", "gaussian"), ("cps", "gaussian"), ("cps", "unnormalized")]
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_log_ratio_matches_kernel_log_probs(sampler, cps_logprob, reduction):
    """At a small size (where the difference of log-probs is accurate) both ways agree, for every kernel."""
    k = Kernel(sampler=sampler, eta=0.7, sigma_max=0.96, logprob_reduction=reduction, cps_logprob=cps_logprob)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, 3, generator=g).double()
    v_old, v_new = torch.randn(4, 2, 3, 3, generator=g).double(), torch.randn(4, 2, 3, 3, generator=g).double()
    s, sn = torch.full((4,), 0.6), torch.full((4,), 0.5)
    old = k.step(v_old, x, s, sn, generator=g)
    new = k.step(v_new, x, s, sn, prev_sample=old.x_next)
    direct = k.log_ratio(old.x_next, new.mean, old.mean, old.std)
    assert torch.allclose(direct, new.log_prob - old.log_prob, atol=1e-5, rtol=1e-5)
    assert torch.equal(k.log_ratio(old.x_next, old.mean, old.mean, old.std), torch.zeros(4))


def test_log_ratio_rejects_bad_shapes():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="share a shape"):
        gaussian_log_ratio(a, a, torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="std must be"):
        gaussian_log_ratio(a, a, a, torch.ones(3))

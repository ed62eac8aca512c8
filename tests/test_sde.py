import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowdppo.config import load_config
from flowdppo.core import sde
from flowdppo.core.sde import Kernel, cps_step, dance_step, flow_sde_step, gaussian_kl, transition_std

SAMPLER_FNS = {"flow-sde": flow_sde_step, "cps": cps_step, "dance": dance_step}


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 10, 40])
def test_diffusers_schedule_matches_scheduler(shift, n):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = sde.diffusers_sigmas(n, dict(sched.config))
    assert ours.shape == (n + 1,)
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
@pytest.mark.parametrize("n", [1, 10, 28])
def test_diffusers_schedule_dynamic_shift(seq_len, n):
    cfg = dict(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = sde.flux_mu(seq_len)
    sched.set_timesteps(n, mu=mu)
    assert torch.allclose(sde.diffusers_sigmas(n, dict(sched.config), mu=mu), sched.sigmas.float(), atol=1e-6, rtol=0)
    # as the FLUX pipelines call it: custom base sigmas linspace(1, 1/N, N)
    base = torch.linspace(1.0, 1.0 / n, n).numpy()
    sched.set_timesteps(sigmas=base, mu=mu)
    assert torch.allclose(
        sde.diffusers_sigmas(n, dict(sched.config), mu=mu, base_sigmas=base), sched.sigmas.float(), atol=1e-6, rtol=0
    )


def test_diffusers_schedule_shift_terminal_and_linear():
    cfg = dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1)
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sched.set_timesteps(12, mu=0.9)
    assert torch.allclose(sde.diffusers_sigmas(12, dict(sched.config), mu=0.9), sched.sigmas.float(), atol=1e-6)


def test_schedule_values_from_spec():
    d = sde.diffusers_sigmas(10, {"shift": 3.0})
    assert torch.allclose(
        d, torch.tensor([1.0, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0.0]), atol=6e-4
    )
    u = sde.uniform_shift_sigmas(10, 3.0)
    assert u[0] == 1 and u[-1] == 0
    assert u[1].item() == pytest.approx(0.9643, abs=1e-4) and u[9].item() == pytest.approx(0.25, abs=1e-6)


def test_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match="mu"):
        sde.diffusers_sigmas(10, {"use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="uniform-shift"):  # the schedule is chosen in the config
        load_config(overrides=["sampling.schedule=cosine"])
    with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
        sde.diffusers_sigmas(10, {"use_karras_sigmas": True})


# ---------------------------------------------------------------- kernels


def _inputs(b=4, shape=(3, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g).to(dtype)
    v = torch.randn(b, *shape, generator=g).to(dtype)
    return x, v


@pytest.mark.parametrize("name", ["flow-sde", "cps", "dance", "ode"])
def test_eta_zero_is_euler(name):
    x, v = _inputs()
    k = Kernel(sampler=name, eta=0.0, sigma_max=0.96)
    out = k.step(v, x, 0.8, 0.7)
    dt = torch.tensor(0.7) - torch.tensor(0.8)  # fp32, as the kernel computes it
    assert torch.equal(out.x_next, x + dt * v)
    assert out.log_prob is None and torch.all(out.std == 0)
    if name != "ode":
        direct = SAMPLER_FNS[name](v, x, 0.8, 0.7, 0.0)
        assert torch.equal(direct.x_next, out.x_next)


def test_cps_eta_zero_algebra():
    # with eta = 0 the CPS formula itself (not the shortcut) collapses to the Euler step
    x, v = _inputs()
    s, sn = 0.8, 0.7
    x0, x1 = x - s * v, x + (1 - s) * v
    assert torch.allclose((1 - sn) * x0 + sn * x1, x + (sn - s) * v, atol=1e-6)


@pytest.mark.parametrize("name", ["flow-sde", "cps", "dance"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_replay_reproduces_logprob_exactly(name, reduction):
    x, v = _inputs()
    k = Kernel(sampler=name, eta=0.7, sigma_max=0.9643, logprob_reduction=reduction)
    g = torch.Generator().manual_seed(1)
    for s, sn in [(1.0, 0.9643), (0.8750, 0.8182)]:
        samp = k.step(v, x, s, sn, generator=g)
        rep = k.step(v, x, s, sn, prev_sample=samp.x_next)
        assert torch.equal(rep.log_prob, samp.log_prob)
        assert torch.equal(rep.mean, samp.mean) and torch.equal(rep.std, samp.std)
        assert torch.equal(rep.x_next, samp.x_next)


@pytest.mark.parametrize("name", ["flow-sde", "cps"])
def test_replay_with_bf16_model_outputs(name):
    """Rollout and replay see bf16 velocities that differ by one bf16 rounding of a recomputation:
    the mean-reduced log-prob then agrees to 1e-3 (the tolerance the trainer warns at)."""
    x, v = _inputs(b=8, shape=(16, 16, 16))
    k = Kernel(sampler=name, eta=0.7, sigma_max=0.9643)
    v_roll = v.to(torch.bfloat16)
    v_replay = (v * (1 + 1e-3)).to(torch.bfloat16)  # a slightly different bf16 forward
    samp = k.step(v_roll, x, 0.9231, 0.8750, generator=torch.Generator().manual_seed(0))
    rep = k.step(v_replay, x, 0.9231, 0.8750, prev_sample=samp.x_next)
    assert samp.mean.dtype == torch.float32
    assert (rep.log_prob - samp.log_prob).abs().max() < 1e-3
    exact = k.step(v_roll, x, 0.9231, 0.8750, prev_sample=samp.x_next)
    assert torch.equal(exact.log_prob, samp.log_prob)


def test_maths_in_fp32_for_half_inputs():
    x, v = _inputs(dtype=torch.bfloat16)
    out = flow_sde_step(v, x, 0.8, 0.7, 0.7)
    assert out.x_next.dtype == out.mean.dtype == out.log_prob.dtype == torch.float32


def test_flow_sde_formula_and_sigma_one():
    x, v = _inputs()
    s, sn, eta = 0.8750, 0.8182, 0.7
    a = eta * math.sqrt(s / (1 - s))
    dt = sn - s
    mean = x * (1 + a**2 / (2 * s) * dt) + v * (1 + a**2 * (1 - s) / (2 * s)) * dt
    out = flow_sde_step(v, x, s, sn, eta, prev_sample=x)
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert out.std[0].item() == pytest.approx(a * math.sqrt(-dt), rel=1e-6)
    # sigma = 1 uses sigma_max = sigmas[1] in the denominator: std = eta / sqrt(1 - s1) * sqrt(1 - s1)
    std1 = transition_std("flow-sde", 1.0, 0.9643, 0.7, sigma_max=0.9643)
    assert std1.item() == pytest.approx(0.7 / math.sqrt(1 - 0.9643) * math.sqrt(1 - 0.9643), rel=1e-5)
    # per-step numbers of the notes (SD3.5, 10 steps, shift 3, eta 0.7)
    sig = sde.uniform_shift_sigmas(10, 3.0)
    got = [transition_std("flow-sde", sig[k], sig[k + 1], 0.7, sigma_max=float(sig[1])).item() for k in range(5)]
    assert got == pytest.approx([0.700, 0.738, 0.532, 0.442, 0.388], abs=2e-3)
    cps = [transition_std("cps", sig[k], sig[k + 1], 0.8).item() for k in range(5)]
    assert cps == pytest.approx([0.917, 0.878, 0.832, 0.778, 0.713], abs=2e-3)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(v, x, 1.0, 0.96, 0.7)


def test_cps_formula_and_unnormalized_logprob():
    x, v = _inputs()
    s, sn, eta = 0.9, 0.8, 0.8
    out = cps_step(v, x, s, sn, eta, generator=torch.Generator().manual_seed(0))
    x0, x1 = x - s * v, x + (1 - s) * v
    assert torch.allclose(out.mean, (1 - sn) * x0 + sn * math.cos(eta * math.pi / 2) * x1, atol=1e-6)
    assert out.std[0].item() == pytest.approx(sn * math.sin(eta * math.pi / 2), rel=1e-6)
    un = cps_step(v, x, s, sn, eta, prev_sample=out.x_next, cps_logprob="unnormalized")
    assert torch.allclose(un.log_prob, -((out.x_next - out.mean) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_dance_has_constant_coefficient():
    assert transition_std("dance", 0.5, 0.4, 0.3).item() == pytest.approx(0.3 * math.sqrt(0.1), rel=1e-6)


def test_logprob_sum_is_exact_density():
    x, v = _inputs(b=2, shape=(5,))
    out = flow_sde_step(v, x, 0.7, 0.6, 0.7, reduction="sum", generator=torch.Generator().manual_seed(0))
    dist = torch.distributions.Normal(out.mean.double(), out.std.double()[:, None])
    assert torch.allclose(out.log_prob.double(), dist.log_prob(out.x_next.double()).sum(-1), atol=1e-5)
    mean_red = flow_sde_step(v, x, 0.7, 0.6, 0.7, prev_sample=out.x_next, reduction="mean")
    assert torch.allclose(mean_red.log_prob * 5, out.log_prob, atol=1e-5)


def test_shape_errors():
    x, v = _inputs()
    with pytest.raises(ValueError, match="shape"):
        flow_sde_step(v[:, :1], x, 0.8, 0.7, 0.7)
    with pytest.raises(ValueError, match=r"\[B\]"):
        flow_sde_step(v, x, torch.ones(3) * 0.8, 0.7, 0.7)
    with pytest.raises(ValueError, match="prev_sample"):
        flow_sde_step(v, x, 0.8, 0.7, 0.7, prev_sample=x[:, :1])
    with pytest.raises(ValueError, match="zero std"):
        cps_step(v, x, 0.1, 0.0, 0.8)
    with pytest.raises(ValueError, match="sampler"):
        Kernel(sampler="ddim")


def test_per_sample_sigmas():
    x, v = _inputs(b=2)
    s = torch.tensor([0.9, 0.5])
    sn = torch.tensor([0.8, 0.4])
    both = flow_sde_step(v, x, s, sn, 0.7, prev_sample=x)
    one = flow_sde_step(v[1:], x[1:], 0.5, 0.4, 0.7, prev_sample=x[1:])
    assert torch.allclose(both.mean[1:], one.mean) and torch.allclose(both.log_prob[1:], one.log_prob)


# ---------------------------------------------------------------- exact KL


@pytest.mark.parametrize("name", ["flow-sde", "cps"])
@pytest.mark.parametrize("k", [0, 2, 4])
def test_closed_form_kl_matches_monte_carlo(name, k):
    """KL(old || new) = E_old[log p_old - log p_new] estimated from 40k draws, within 2%."""
    sig = sde.uniform_shift_sigmas(10, 3.0)
    kern = Kernel.for_schedule(sig, sampler=name, eta=0.7, logprob_reduction="sum")
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, 64, generator=g).expand(40000, 64)
    v_old = torch.randn(1, 64, generator=g).expand(40000, 64)
    direction = torch.randn(1, 64, generator=g)  # same network input, different weights
    probe = kern.step(v_old[:1] + direction, x[:1], sig[k], sig[k + 1], prev_sample=x[:1])
    base = kern.step(v_old[:1], x[:1], sig[k], sig[k + 1], prev_sample=x[:1])
    scale = (1.0 / kern.kl(probe.mean, base.mean, base.std)[0]).sqrt()  # aim at KL = 1: MC error ~0.7%
    v_new = v_old + scale * direction
    old = kern.step(v_old, x, sig[k], sig[k + 1], generator=g)
    new = kern.step(v_new, x, sig[k], sig[k + 1], prev_sample=old.x_next)
    mc = (old.log_prob.double() - new.log_prob.double()).mean().item()
    exact = kern.kl(new.mean, old.mean, old.std)[0].item()
    assert exact == pytest.approx(1.0, rel=1e-3)
    assert mc == pytest.approx(exact, rel=0.02)


def test_kl_formula_and_reduction():
    a = torch.randn(3, 4, 5)
    b = torch.randn(3, 4, 5)
    std = torch.tensor([0.5, 1.0, 2.0])
    full = gaussian_kl(a, b, std, "sum")
    ref = ((a - b) ** 2).sum(dim=(1, 2)) / (2 * std**2)
    assert torch.allclose(full, ref)
    assert torch.allclose(gaussian_kl(a, b, std, "mean"), ref / 20)
    assert torch.allclose(gaussian_kl(a, b, std), gaussian_kl(b, a, std))
    with pytest.raises(ValueError, match="std"):
        gaussian_kl(a, b, std[:2])


def test_log_ratio_moments_high_dim():
    """In dimension >= 4096, log r has mean -KL and variance 2 KL (docs/flow-dppo.md, section "Ratio noise")."""
    dim, n = 4096, 4000
    g = torch.Generator().manual_seed(0)
    std = torch.full((n,), 0.5)
    mean_old = torch.randn(1, dim, generator=g).expand(n, dim)
    d = 0.5 * 0.02 * torch.randn(1, dim, generator=g)  # KL = ||d||^2 / (2 std^2) ~ 0.4
    mean_new = mean_old + d
    x = mean_old + std[:, None] * torch.randn(n, dim, generator=g)
    log_r = (sde.gaussian_log_prob(x, mean_new, std, "sum") - sde.gaussian_log_prob(x, mean_old, std, "sum")).double()
    kl = gaussian_kl(mean_new, mean_old, std, "sum")[0].item()
    se_mean = math.sqrt(2 * kl / n)
    assert abs(log_r.mean().item() + kl) < 4 * se_mean
    assert log_r.var().item() == pytest.approx(2 * kl, rel=4 * math.sqrt(2 / n))

import itertools
import math

import pytest
import torch

from flowdppo.core import losses
from flowdppo.core.losses import LossInputs, LossSpec, policy_loss
from flowdppo.core.sde import Kernel, gaussian_kl, uniform_shift_sigmas

DELTA = 1e-5


def _inp(log_ratio, adv, kl, **kw):
    lr = torch.as_tensor(log_ratio, dtype=torch.float32).reshape(-1, 1).clone().requires_grad_(True)
    n = lr.shape[0]
    return LossInputs(
        logp_new=lr,
        logp_old=torch.zeros(n, 1),
        adv=torch.as_tensor(adv, dtype=torch.float32),
        kl=torch.as_tensor(kl, dtype=torch.float32).reshape(n, 1),
        **kw,
    ), lr


def test_flow_dppo_truth_table():
    cases = list(itertools.product([1.0, -1.0, 0.0], [0.3, -0.3, 0.0], [DELTA * 10, DELTA / 10]))
    adv = [c[0] for c in cases]
    lr = [c[1] for c in cases]
    kl = [c[2] for c in cases]
    inp, leaf = _inp(lr, adv, kl)
    loss, m = losses.flow_dppo_loss(inp, DELTA)
    for i, (a, logr, d) in enumerate(cases):
        r = math.exp(logr)
        moving_away = (a > 0 and r > 1) or (a < 0 and r < 1)
        expect_masked = d > DELTA and moving_away
        expected = 0.0 if expect_masked else -a * r
        assert loss[i, 0].item() == pytest.approx(expected, abs=1e-7), (a, logr, d)
    n_masked = sum((d > DELTA) and ((a > 0 and lr_ > 0) or (a < 0 and lr_ < 0)) for a, lr_, d in cases)
    assert m["masked_frac"] == pytest.approx(n_masked / len(cases))
    assert m["masked_pos_adv_frac"] + m["masked_neg_adv_frac"] == pytest.approx(m["masked_frac"])


def test_corrective_moves_never_masked_whatever_the_kl():
    # A > 0 with r < 1 and A < 0 with r > 1, with an enormous divergence
    inp, leaf = _inp([-2.0, 2.0], [1.0, -1.0], [1e6, 1e6])
    loss, m = losses.flow_dppo_loss(inp, DELTA)
    assert m["masked_frac"] == 0
    loss.sum().backward()
    assert torch.all(leaf.grad != 0)


def test_masked_entries_get_exactly_zero_gradient():
    inp, leaf = _inp([0.5, 0.5, -0.5, -0.5], [1.0, 1.0, -1.0, -1.0], [1.0, 0.0, 1.0, 0.0])
    loss, m = losses.flow_dppo_loss(inp, DELTA)
    losses.reduce_loss(loss).backward()
    g = leaf.grad.flatten()
    assert g[0].item() == 0.0 and g[2].item() == 0.0  # masked
    assert g[1].item() != 0.0 and g[3].item() != 0.0  # inside the trust region


def test_inf_ratio_in_masked_entry_gives_no_nan():
    inp, leaf = _inp([1e4, 0.1], [1.0, 1.0], [1.0, 0.0])  # exp(1e4) = inf
    loss, m = losses.flow_dppo_loss(inp, DELTA)
    total = losses.reduce_loss(loss)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(leaf.grad).all()
    assert leaf.grad[0].item() == 0.0
    assert not torch.isnan(loss).any()


def test_reduction_includes_masked_entries():
    inp, _ = _inp([0.5, 0.1], [1.0, 1.0], [1.0, 0.0])
    loss, _ = losses.flow_dppo_loss(inp, DELTA)
    assert losses.reduce_loss(loss).item() == pytest.approx(-math.exp(0.1) / 2)


def test_symmetric_ablation_masks_both_directions():
    inp, _ = _inp([0.5, -0.5, 0.5], [-1.0, -1.0, 1.0], [1.0, 1.0, 0.0])
    loss, m = losses.dppo_symmetric_loss(inp, DELTA)
    assert loss[0].item() == 0 and loss[1].item() == 0 and loss[2].item() != 0
    assert m["masked_frac"] == pytest.approx(2 / 3)


def test_ppo_clip_is_textbook():
    g = torch.Generator().manual_seed(0)
    lr = 0.3 * torch.randn(64, 3, generator=g)
    adv = torch.randn(64, generator=g) * 3
    eps = 0.2
    inp = LossInputs(logp_new=lr.clone().requires_grad_(True), logp_old=torch.zeros(64, 3), adv=adv)
    loss, m = losses.ppo_clip_loss(inp, eps, adv_clip=None)
    r = lr.exp()
    a = adv[:, None]
    ref = -torch.minimum(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)
    assert torch.allclose(loss, ref, atol=1e-6)
    # advantage clipping at 5 (Flow-GRPO)
    clipped, _ = losses.ppo_clip_loss(inp, eps, adv_clip=0.5)
    ac = adv.clamp(-0.5, 0.5)[:, None]
    assert torch.allclose(clipped, -torch.minimum(r * ac, torch.clamp(r, 1 - eps, 1 + eps) * ac), atol=1e-6)
    # clip fractions by side: entries whose gradient is cut
    hi = ((r > 1 + eps) & (a > 0)).float().mean().item()
    lo = ((r < 1 - eps) & (a < 0)).float().mean().item()
    assert m["clip_high_frac"] == pytest.approx(hi) and m["clip_low_frac"] == pytest.approx(lo)
    assert m["clip_frac"] == pytest.approx(hi + lo)


def test_grpo_guard_recentred_log_ratio_has_zero_mean():
    """On actions drawn from the old policy, (log r + b) has mean ~0 while log r has mean -KL."""
    sig = uniform_shift_sigmas(10, 3.0)
    kern = Kernel.for_schedule(sig, sampler="flow-sde", eta=0.7)
    n, shape = 2000, (4, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=g).expand(n, *shape)
    v_old = torch.randn(1, *shape, generator=g).expand(n, *shape)
    v_new = v_old + 3.0 * torch.randn(1, *shape, generator=g)
    k = 2
    old = kern.step(v_old, x, sig[k], sig[k + 1], generator=g)
    new = kern.step(v_new, x, sig[k], sig[k + 1], prev_sample=old.x_next)
    kl = kern.kl(new.mean, old.mean, old.std)
    log_r = new.log_prob - old.log_prob
    bias = losses.guard_bias(new.mean[:, None], old.mean[:, None], old.std[:, None])[:, 0]
    assert torch.allclose(bias, kl, rtol=1e-5)  # b = mean-reduced KL = -E[log r]
    se = log_r.std().item() / math.sqrt(n)
    assert abs(log_r.mean().item() + kl.mean().item()) < 4 * se
    assert abs((log_r + bias).mean().item()) < 4 * se
    assert abs(log_r.mean().item()) > 10 * se  # the un-centred one is clearly off zero

    inp = LossInputs(
        logp_new=new.log_prob[:, None],
        logp_old=old.log_prob[:, None],
        adv=torch.ones(n),
        mean_new=new.mean[:, None],
        mean_old=old.mean[:, None],
        std=old.std[:, None],
        dt=(sig[k] - sig[k + 1]).expand(n, 1).float(),
        kl=kl[:, None],
    )
    loss, m = losses.grpo_guard_loss(inp, eps=1e9)  # no clipping: loss = -A r~ / dt
    r_t = torch.exp((log_r + bias) * old.std)
    assert torch.allclose(loss[:, 0], -r_t / (sig[k] - sig[k + 1]), rtol=1e-5)


def test_unclipped_and_beta_term():
    g = torch.Generator().manual_seed(0)
    lr = 0.1 * torch.randn(8, 3, generator=g)
    adv = torch.randn(8, generator=g)
    kl_ref = torch.rand(8, 3, generator=g)
    inp = LossInputs(logp_new=lr, logp_old=torch.zeros(8, 3), adv=adv, kl=torch.zeros(8, 3), kl_ref=kl_ref)
    loss, m = policy_loss(inp, LossSpec(name="unclipped", beta=0.01))
    assert torch.allclose(loss, -adv[:, None] * lr.exp() + 0.01 * kl_ref, atol=1e-6)
    assert m["kl_ref"] == pytest.approx(kl_ref.mean().item())
    with pytest.raises(ValueError, match="kl_ref"):
        policy_loss(LossInputs(logp_new=lr, logp_old=torch.zeros(8, 3), adv=adv), LossSpec(name="clip", beta=0.1))


def test_reference_kl_gradient_flows_through_new_mean_only():
    mean_new = torch.randn(4, 16, requires_grad=True)
    mean_ref = torch.randn(4, 16, requires_grad=True)
    kl = gaussian_kl(mean_new, mean_ref.detach(), torch.full((4,), 0.5))
    kl.sum().backward()
    assert mean_new.grad is not None and mean_ref.grad is None


@pytest.mark.parametrize("name", losses.LOSSES)
def test_first_minibatch_is_identity(name):
    """With logp_new == logp_old and equal means: r = 1, D = 0, nothing masked or clipped."""
    n, s = 6, 3
    means = torch.randn(n, s, 2, 4, 4)
    lp = torch.randn(n, s)
    inp = LossInputs(
        logp_new=lp.clone(),
        logp_old=lp,
        adv=torch.randn(n),
        kl=torch.zeros(n, s),
        mean_new=means.clone(),
        mean_old=means,
        std=torch.full((n, s), 0.5),
        dt=torch.full((n, s), 0.05),
        kl_ref=torch.zeros(n, s),
    )
    loss, m = policy_loss(inp, LossSpec(name=name))
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0 and m["kl_max"] == 0.0
    assert m.get("masked_frac", 0.0) == 0.0 and m.get("clip_frac", 0.0) == 0.0
    assert all(isinstance(v, float) for v in m.values())


def test_shape_checks():
    with pytest.raises(ValueError, match=r"adv must be \[B\]"):
        LossInputs(logp_new=torch.zeros(4, 3), logp_old=torch.zeros(4, 3), adv=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="logp_old"):
        LossInputs(logp_new=torch.zeros(4, 3), logp_old=torch.zeros(4), adv=torch.zeros(4))
    with pytest.raises(ValueError, match="B, S"):
        LossInputs(logp_new=torch.zeros(4), logp_old=torch.zeros(4), adv=torch.zeros(4))
    with pytest.raises(ValueError, match="valid"):
        LossSpec(name="ppo")
    with pytest.raises(ValueError, match="kl"):
        losses.flow_dppo_loss(
            LossInputs(logp_new=torch.zeros(2, 1), logp_old=torch.zeros(2, 1), adv=torch.zeros(2)), DELTA
        )


def _all_inputs(n=6, s=3, seed=0, exact=None):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, s, 2, 4, 4, generator=g)
    return LossInputs(
        logp_new=torch.randn(n, s, generator=g),
        logp_old=torch.randn(n, s, generator=g),
        adv=torch.randn(n, generator=g),
        kl=torch.rand(n, s, generator=g) * 2 * DELTA,
        mean_new=means + 0.01 * torch.randn(n, s, 2, 4, 4, generator=g),
        mean_old=means,
        std=torch.full((n, s), 0.5),
        dt=torch.full((n, s), 0.05),
        kl_ref=torch.rand(n, s, generator=g),
        exact_log_ratio=exact,
    )


@pytest.mark.parametrize("name", losses.LOSSES)
def test_every_loss_reads_the_exact_log_ratio(name):
    """Given ``exact_log_ratio``, a loss equals the loss of ``logp_new = exact, logp_old = 0``, gradient included."""
    g = torch.Generator().manual_seed(3)
    exact = (0.2 * torch.randn(6, 3, generator=g)).requires_grad_(True)
    with_exact = _all_inputs(exact=exact)
    plain = _all_inputs()
    lp = exact.detach().clone().requires_grad_(True)
    plain.logp_new, plain.logp_old = lp, torch.zeros(6, 3)
    spec = LossSpec(name=name, beta=0.01)
    loss_a, m_a = policy_loss(with_exact, spec)
    loss_b, m_b = policy_loss(plain, spec)
    assert torch.allclose(loss_a, loss_b)
    assert m_a == pytest.approx(m_b)
    loss_a.sum().backward()
    loss_b.sum().backward()
    assert torch.allclose(exact.grad, lp.grad)
    with pytest.raises(ValueError, match="exact_log_ratio"):
        _all_inputs(exact=torch.zeros(6))


@pytest.mark.parametrize("name", losses.LOSSES)
def test_tensor_metrics_need_no_host_sync(name, monkeypatch):
    """``tensor_metrics=True``: no ``.item()``/``float()``/``.tolist()`` anywhere in the loss; the float
    metrics are the same values, converted in one transfer."""
    floats = policy_loss(_all_inputs(), LossSpec(name=name))[1]

    def no_sync(*a, **k):
        raise AssertionError("host sync inside the loss")

    with monkeypatch.context() as mp:
        for attr in ("item", "tolist", "__float__", "__bool__", "__int__"):
            mp.setattr(torch.Tensor, attr, no_sync)
        _, tensors = policy_loss(_all_inputs(), LossSpec(name=name), tensor_metrics=True)
    assert set(tensors) == set(floats)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in tensors.values())
    assert losses.metrics_to_floats(tensors) == floats

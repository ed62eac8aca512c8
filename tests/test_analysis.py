import torch

from flowdppo.core.analysis import format_report, ratio_noise_report


def test_ratio_noise_report_matches_theory():
    n, s, dim = 3000, 2, 4096
    g = torch.Generator().manual_seed(0)
    std = torch.full((n, s), 0.5)
    mean_old = torch.randn(1, s, dim, generator=g).expand(n, s, dim)
    kls = torch.tensor([0.05, 0.5])
    direction = torch.randn(1, s, dim, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    d = direction * (kls * 2 * 0.25).sqrt()[None, :, None]  # ||d||^2 / (2 std^2) = KL
    mean_new = mean_old + d
    actions = mean_old + 0.5 * torch.randn(n, s, dim, generator=g)
    stats = ratio_noise_report(mean_old, mean_new, std, actions, clip_eps=0.2, step_indices=[0, 3])
    for st, kl in zip(stats, kls.tolist()):
        assert abs(st.kl_mean - kl) < 1e-4
        assert abs(st.log_r_mean - st.log_r_mean_pred) < 4 * st.log_r_std_pred / n**0.5
        assert abs(st.log_r_std / st.log_r_std_pred - 1) < 0.05
        assert st.ratio_median < 1.0
    # clipping grows with the KL and is mostly on the r < 1 side
    assert stats[1].clip_low_frac > stats[0].clip_low_frac
    assert stats[1].clip_low_frac > stats[1].clip_high_frac
    # the notes' table (Gaussian model, exact ratio, eps 0.2): P(clipped) 0.523 at KL 0.05, 0.857 at KL 0.5
    assert abs(stats[0].clip_low_frac + stats[0].clip_high_frac - 0.523) < 0.03
    assert abs(stats[1].clip_low_frac + stats[1].clip_high_frac - 0.857) < 0.03
    assert stats[1].step == 3 and "KL" in format_report(stats)
    # mean reduction: same mean, variance divided by n_dims
    mstats = ratio_noise_report(mean_old, mean_new, std, actions, reduction="mean")
    assert abs(mstats[1].log_r_std / mstats[1].log_r_std_pred - 1) < 0.05

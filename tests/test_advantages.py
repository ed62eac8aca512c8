import pytest
import torch

from flowdppo.core import advantages as A


def _batch():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0, 3.0, 3.0, 0.2, 0.2, 0.2, 0.2])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    return rewards, groups


def test_group_means_are_zero_and_global_std_by_hand():
    r, g = _batch()
    adv = A.group_advantages(r, g)
    for k in range(3):
        assert adv[g == k].sum().item() == pytest.approx(0.0, abs=1e-6)
    means = torch.tensor([0.5] * 4 + [3.0] * 4 + [0.2] * 4)
    sd = r.std(unbiased=True)  # one std over the whole batch
    assert torch.allclose(adv, (r - means) / (sd + 1e-8), atol=1e-6)
    # by hand for one entry: group 1 mean 3.0, sample 4.0
    import statistics

    assert adv[5].item() == pytest.approx((4.0 - 3.0) / statistics.stdev(r.tolist()), rel=1e-5)


def test_group_std_mode_and_clip():
    r, g = _batch()
    adv = A.group_advantages(r, g, std="group")
    grp0 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert torch.allclose(adv[:4], (grp0 - 0.5) / (grp0.std(unbiased=False) + 1e-8), atol=1e-6)
    assert torch.all(adv[8:] == 0)  # zero-std group gives zero advantage, not NaN
    assert A.group_advantages(r, g, clip=0.5).abs().max() <= 0.5
    with pytest.raises(ValueError, match="valid"):
        A.group_advantages(r, g, std="batch")


def test_zero_std_fraction():
    r, g = _batch()
    assert A.zero_std_group_fraction(r, g) == pytest.approx(1 / 3)


def test_gdpo_by_hand():
    r = torch.tensor([[1.0, 10.0], [0.0, 30.0], [2.0, 20.0], [4.0, 20.0]])
    g = torch.tensor([0, 0, 1, 1])
    w = [1.0, 0.5]
    adv = A.gdpo_advantages(r, g, w)
    # each reward normalised within its group (population std)
    n0 = torch.tensor([1.0, -1.0, -1.0, 1.0])  # reward 0: groups (1,0) and (2,4)
    n1 = torch.tensor([-1.0, 1.0, 0.0, 0.0])  # reward 1: groups (10,30), (20,20) -> zero std
    total = n0 * 1.0 + n1 * 0.5
    expect = (total - total.mean()) / (total.std(unbiased=True) + 1e-8)
    assert torch.allclose(adv, expect, atol=1e-5)
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6)


def test_stat_tracker_across_iterations_and_state():
    t = A.PerPromptStatTracker(buffer_size=8, min_count=2, global_std=False)
    a1 = t.update(["p", "p", "q", "q"], torch.tensor([1.0, 3.0, 0.0, 0.0]))
    assert torch.allclose(a1[:2], torch.tensor([-1.0, 1.0]), atol=1e-6)
    a2 = t.update(["p", "p"], torch.tensor([5.0, 7.0]))
    hist = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert torch.allclose(a2, (torch.tensor([5.0, 7.0]) - hist.mean()) / (hist.std(unbiased=False) + 1e-8), atol=1e-6)
    t2 = A.PerPromptStatTracker(buffer_size=8, min_count=2, global_std=False)
    t2.load_state_dict(t.state_dict())
    assert torch.allclose(t2.update(["p"], torch.tensor([2.0])), t.update(["p"], torch.tensor([2.0])))


def test_shape_errors():
    with pytest.raises(ValueError, match="group_ids"):
        A.group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        A.gdpo_advantages(torch.zeros(4), torch.zeros(4, dtype=torch.long))

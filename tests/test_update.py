"""One optimizer step (flowdppo.training.update.minibatch_step): the exact log-ratio, one transfer of metrics."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import make  # noqa: E402


def _batch(tr):
    traj, adv, _, _ = tr.collect(0)
    perm = torch.randperm(len(traj), generator=torch.Generator().manual_seed(0))
    return traj, adv, perm, tr.anchor(traj, perm)


@pytest.mark.parametrize("preset", ["flow-dppo", "flow-grpo", "grpo-guard"])
def test_minibatch_step_reads_metrics_once(tmp_path, monkeypatch, preset):
    """No ``.item()`` / ``float()`` on a tensor inside the step (outside the optimizer's own bookkeeping):
    the metrics come back with a single ``.tolist()``."""
    tr = make(tmp_path, preset=preset, name=preset)
    traj, adv, perm, anchor = _batch(tr)
    mb = perm[: tr.cfg.train.minibatch_size]
    counts = {"item": 0, "__float__": 0, "tolist": 0}
    active = {"on": True}
    for name in counts:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if active["on"]:
                counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = tr.optimizer.step

    def optimizer_step(*a, **k):  # AdamW reads its step counters with .item(): not ours to count
        active["on"] = False
        try:
            return step(*a, **k)
        finally:
            active["on"] = True

    monkeypatch.setattr(tr.optimizer, "step", optimizer_step)
    tr.model.module.train()
    m = tr.train_minibatch(traj, mb, adv, anchor)
    active["on"] = False
    assert counts == {"item": 0, "__float__": 0, "tolist": 1}
    assert all(isinstance(v, float) for v in m.values()) and m["grad_norm"] > 0
    # the first mini-batch of an iteration: ratio 1 and KL 0 exactly
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0 and m["kl_max"] == 0.0


def test_minibatch_metrics_are_the_loss_functions_on_the_whole_minibatch(tmp_path):
    """The metrics equal the pure loss's on the recorded per-entry values (same names, same values)."""
    from flowdppo.core.losses import LossInputs, policy_loss
    from flowdppo.training.rollout import replay_step

    tr = make(tmp_path)
    traj, adv, perm, anchor = _batch(tr)
    mb = perm[: tr.cfg.train.minibatch_size]
    s = len(traj.sde_steps)
    # the pre-step values, recomputed independently
    with torch.no_grad():
        outs = [replay_step(tr.model, tr.kernel, traj, mb, j, 1.0) for j in range(s)]
    logp_new = torch.stack([o.log_prob for o in outs], 1)
    kl = torch.stack(
        [tr.kernel.kl(o.mean, anchor["means"][mb, j], anchor["std"][mb, j]) for j, o in enumerate(outs)], 1
    )
    exact = torch.stack(
        [
            tr.kernel.log_ratio(traj.next_latents[mb, j], o.mean, anchor["means"][mb, j], anchor["std"][mb, j])
            for j, o in enumerate(outs)
        ],
        1,
    )
    dt = torch.stack([traj.sigmas[k] - traj.sigmas[k + 1] for k in traj.sde_steps]).float().expand(len(mb), s)
    inp = LossInputs(
        logp_new=logp_new,
        logp_old=anchor["logp"][mb],
        adv=adv[mb],
        kl=kl,
        std=anchor["std"][mb],
        dt=dt,
        exact_log_ratio=exact,
    )
    _, expected = policy_loss(inp, tr.loss_spec)
    tr.model.module.train()
    m = tr.train_minibatch(traj, mb, adv, anchor)
    assert set(expected) <= set(m)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("n,m", [(128, 64), (12, 4), (48, 16)])
def test_minibatch_permutation_balances_every_process_share(n, m):
    """Each mini-batch is one sample of every run of n/m consecutive samples, listed in run order, so for
    every process count N dividing m its j-th 1/N holds only (and as many of) process j's samples."""
    from flowdppo.training.update import minibatch_permutation, spread_subsample

    g = torch.Generator().manual_seed(0)
    perm = minibatch_permutation(n, m, g)
    assert sorted(perm.tolist()) == list(range(n))
    assert not torch.equal(perm, minibatch_permutation(n, m, g))  # random: another epoch, another order
    for world in (w for w in (1, 2, 4) if m % w == 0):
        share = n // world
        for mb in perm.split(m):
            for j, part in enumerate(mb.split(m // world)):
                assert ((part >= j * share) & (part < (j + 1) * share)).all()
        for want in (1, 3, m // 2, m + 5, 0):
            sub = spread_subsample(perm, m, want, world)
            assert len(sub) >= min(want or n, n) and len(set(sub.tolist())) == len(sub)
            counts = [int(((sub >= j * share) & (sub < (j + 1) * share)).sum()) for j in range(world)]
            assert len(set(counts)) == 1, (want, world, counts)


def test_trajectories_refuse_samples_held_elsewhere(tmp_path):
    tr = make(tmp_path)
    traj, _, _, _ = _batch(tr)
    assert torch.equal(traj.rows(traj.local_indices), torch.arange(traj.local_size))
    with pytest.raises(IndexError, match="not all held here"):
        traj.rows(torch.tensor([0, len(traj)]))

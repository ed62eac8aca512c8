"""train.rollout_graph: training back-propagates through the rollout's own forwards of the trained steps
when its single optimizer step runs at the rollout's weights, and the update is the recomputed one's."""

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from flowdppo.config import load_config
from flowdppo.core.sde import Kernel, uniform_shift_sigmas
from flowdppo.training import update
from flowdppo.training.distributed import Dist
from flowdppo.training.rollout import rollout

sys.path.insert(0, str(Path(__file__).parent))
from test_anchor import BatchDependentToy  # noqa: E402
from test_anchor import _trainer as anchor_trainer  # noqa: E402
from test_trainer import BASE  # noqa: E402
from toy import PROMPTS, ToyModel  # noqa: E402

ONE_STEP = ["train.minibatch_size=16", "train.micro_batch_size=4", "train.rollout_batch_size=8"]  # batch 4 x 4


def _trainer(tmp_path, extra, name, model=None, preset=None):
    return anchor_trainer(tmp_path, ONE_STEP + list(extra), name, model, preset)


def test_rollout_keeps_the_velocities_graphs_and_samples_the_same():
    model = ToyModel(0)
    with torch.no_grad():
        for n, p in model.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # B = 0 at init would leave A without gradient
    sigmas = uniform_shift_sigmas(6, 1.0)
    kernel = Kernel.for_schedule(sigmas, sampler="flow-sde", eta=0.7)
    cond = model.encode_prompts(PROMPTS[:2]).repeat_interleave(3)
    args = (model, kernel, PROMPTS[:2] * 3, torch.arange(6) % 2, cond, sigmas, [1, 3, 4], 1.0)
    plain = rollout(*args, torch.Generator().manual_seed(0), 4)
    kept = rollout(*args, torch.Generator().manual_seed(0), 4, keep_graph=True)
    assert plain.velocities is None
    for k in ("latents", "next_latents", "means", "log_probs", "final"):
        assert torch.equal(getattr(plain, k), getattr(kept, k)), k  # gradients on: the same computation
        assert not getattr(kept, k).requires_grad, k  # nothing stored carries a graph
    assert len(kept.velocities) == 3
    for v in kept.velocities:
        assert v.shape == (6, *model.latent_shape) and v.grad_fn is not None
    # the graph reaches the LoRA weights through this step's forward alone: the trajectory's inputs are
    # detached, so the gradient equals that of a fresh forward at the stored latent (none flows back through
    # the earlier steps that produced it)
    lora = model.trainable_parameters()
    w = torch.linspace(-1, 1, kept.velocities[2].numel()).view_as(kept.velocities[2])
    g = torch.autograd.grad((kept.velocities[2] * w).sum(), lora)
    fresh = model.velocity(kept.latents[:, 2], torch.full((6,), float(sigmas[4])), cond)
    g_fresh = torch.autograd.grad((fresh * w).sum(), lora)
    assert all(x.abs().sum() > 0 for x in g)
    for x, y in zip(g, g_fresh):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)  # chunks of 4 + 2 vs one batch of 6


@pytest.mark.parametrize("preset", ["flow-dppo", "flow-grpo"])
def test_kept_graph_gives_the_recomputed_update(tmp_path, preset):
    kept = _trainer(tmp_path, ["train.rollout_graph=keep"], f"keep-{preset}", preset=preset)
    rec = _trainer(tmp_path, ["train.rollout_graph=recompute"], f"rec-{preset}", preset=preset)
    assert kept.keep_rollout_graph and not rec.keep_rollout_graph
    calls = {"keep": 0, "rec": 0}
    for key, tr in (("keep", kept), ("rec", rec)):
        orig = tr.model.velocity

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        tr.model.velocity = counted
    m_k, m_r = kept.iteration_step(0), rec.iteration_step(0)
    assert m_k["train/rollout_graph"] == 1.0 and m_r["train/rollout_graph"] == 0.0
    # training made no forward of its own: one per SDE step and micro-batch of 4 fewer calls
    assert calls["rec"] - calls["keep"] == len(m_k["sde_steps"]) * 4
    # the first (only) mini-batch starts at ratio 1, KL 0: the anchor and the new log-probs are one forward
    assert m_k["first_mb/ratio_min"] == 1.0 and m_k["first_mb/ratio_max"] == 1.0 and m_k["first_mb/kl_max"] == 0.0
    assert m_k["grad_norm"] > 0
    assert m_k["grad_norm"] == pytest.approx(m_r["grad_norm"], rel=1e-5)
    assert m_k["policy_loss"] == pytest.approx(m_r["policy_loss"], rel=1e-5, abs=1e-8)
    for k, v in kept.model.adapter_state_dict().items():
        torch.testing.assert_close(v, rec.model.adapter_state_dict()[k], rtol=1e-5, atol=1e-7)
    # a second iteration keeps doing so, and both runs still agree
    m_k1, m_r1 = kept.iteration_step(1), rec.iteration_step(1)
    assert m_k1["train/rollout_graph"] == 1.0
    assert m_k1["policy_loss"] == pytest.approx(m_r1["policy_loss"], rel=1e-4, abs=1e-7)


def test_kept_graph_with_a_reference_kl_loss(tmp_path):
    """beta > 0: the reference forward is still made (no grad); the update matches the recomputed one."""
    extra = ["algorithm.beta=0.1"]
    kept = _trainer(tmp_path, ["train.rollout_graph=keep", *extra], "keep-beta")
    rec = _trainer(tmp_path, ["train.rollout_graph=recompute", *extra], "rec-beta")
    m_k, m_r = kept.iteration_step(0), rec.iteration_step(0)
    assert m_k["train/rollout_graph"] == 1.0
    assert m_k["kl_ref"] == pytest.approx(m_r["kl_ref"], rel=1e-5, abs=1e-9)
    for k, v in kept.model.adapter_state_dict().items():
        torch.testing.assert_close(v, rec.model.adapter_state_dict()[k], rtol=1e-5, atol=1e-7)


class _FakeDevice(ToyModel):
    def __init__(self):
        super().__init__(0)
        self.device = torch.device("meta")  # not the CPU; never used to compute here


class _Dropout(ToyModel):
    def __init__(self):
        super().__init__(0)
        self.module.drop = nn.Dropout(0.1)


@pytest.mark.parametrize(
    ("mode", "extra", "model", "expected"),
    [
        ("auto", [], ToyModel, True),
        ("keep", [], ToyModel, True),
        ("recompute", [], ToyModel, False),
        ("auto", [], _FakeDevice, False),  # auto keeps graphs on the CPU only
        ("keep", [], _FakeDevice, True),
        ("keep", ["train.minibatch_size=8"], ToyModel, False),  # two optimizer steps
        ("keep", ["train.inner_epochs=2", "algorithm.loss=flow-dppo"], ToyModel, False),
        ("keep", ["train.anchor=replay"], ToyModel, False),
        ("keep", [], _Dropout, False),  # eval-mode rollout and train-mode training differ
    ],
)
def test_when_the_graph_is_kept(mode, extra, model, expected):
    cfg = load_config(overrides=BASE + ONE_STEP + [f"train.rollout_graph={mode}", *extra])
    m = model()
    reuse = update.reuse_anchor(cfg, m)
    assert update.keep_rollout_graph(cfg, m, Dist(), reuse) is expected


def test_keep_that_cannot_apply_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="flowdppo"):
        load_config(overrides=BASE + ["train.rollout_graph=keep"])  # 16 samples in mini-batches of 8
    assert "train.rollout_graph=keep is ignored" in caplog.text


def test_a_fallback_anchor_drops_the_graph(tmp_path):
    """The anchor check disagrees (a batch-dependent model): the anchor is replayed and training recomputes."""
    tr = _trainer(
        tmp_path,
        ["train.rollout_graph=keep", "train.anchor=auto", "train.anchor_check_samples=2"],
        "fb",
        BatchDependentToy(0),
    )
    m0 = tr.iteration_step(0)
    assert m0["anchor/fallback"] == 1.0 and m0["train/rollout_graph"] == 0.0
    assert m0["first_mb/ratio_min"] == 1.0 and m0["first_mb/ratio_max"] == 1.0
    assert tr.keep_rollout_graph is False
    assert tr.iteration_step(1)["train/rollout_graph"] == 0.0

"""The anchor (train.anchor): reused from the rollout when that is exact, replayed otherwise; the reference KL
diagnostic on a subsample / every N iterations, and from the training forwards at beta > 0."""

import logging
import sys
from pathlib import Path

import pytest
import torch

from flowdppo.config import ConfigError, load_config
from flowdppo.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import BASE, make  # noqa: E402
from toy import PROMPTS, ToyModel, brightness_reward  # noqa: E402


class BatchDependentToy(ToyModel):
    """A model whose velocity depends on the batch it is computed in (as some half-precision kernels do)."""

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        return super().velocity(x, sigma, cond, guidance_scale) + 0.05 * x.shape[0]


def _trainer(tmp_path, extra, name, model=None, preset=None):
    cfg = load_config(preset=preset, overrides=BASE + list(extra))
    return Trainer(
        cfg,
        model=model or ToyModel(0),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={},
        run_dir=tmp_path / name,
    )


@pytest.mark.parametrize("mode", ["rollout", "auto"])
def test_reused_anchor_first_minibatch_has_ratio_one_and_kl_zero(tmp_path, mode):
    reused = make(tmp_path, [f"train.anchor={mode}"], name=f"reuse-{mode}")
    m = reused.iteration_step(0)
    assert m["anchor/reused"] == 1.0 and "anchor/fallback" not in m
    assert m["replay/logp_abs_diff_max"] == 0.0  # the spot check: fp32 rollout and replay agree exactly
    assert m["first_mb/ratio_min"] == 1.0 and m["first_mb/ratio_max"] == 1.0 and m["first_mb/kl_max"] == 0.0
    # the same update as the replayed anchor
    replayed = make(tmp_path, ["train.anchor=replay"], name=f"replay-{mode}")
    m_rep = replayed.iteration_step(0)
    assert m_rep["anchor/reused"] == 0.0
    for k, v in reused.model.adapter_state_dict().items():
        torch.testing.assert_close(v, replayed.model.adapter_state_dict()[k], rtol=0, atol=1e-7)
    assert m["policy_loss"] == pytest.approx(m_rep["policy_loss"], abs=1e-7)


def test_auto_anchor_falls_back_to_replay_when_the_check_disagrees(tmp_path, caplog):
    tr = _trainer(tmp_path, ["train.anchor=auto", "train.anchor_check_samples=2"], "auto", BatchDependentToy(0))
    with caplog.at_level(logging.WARNING, logger="flowdppo"):
        m0 = tr.iteration_step(0)
    assert m0["anchor/fallback"] == 1.0 and m0["anchor/reused"] == 0.0
    assert "replaying the anchor from now on" in caplog.text
    # the replayed anchor is computed in the training micro-batches: exact again
    assert m0["first_mb/ratio_min"] == 1.0 and m0["first_mb/ratio_max"] == 1.0
    m1 = tr.iteration_step(1)
    assert m1["anchor/reused"] == 0.0 and "anchor/fallback" not in m1


def test_a_fallback_survives_resume(tmp_path):
    extra = ["train.anchor=auto", "train.anchor_check_samples=2", "log.checkpoint_every=1"]
    tr = _trainer(tmp_path, extra, "resume-fallback", BatchDependentToy(0))
    tr.run(progress=False, stop_after=1)
    assert tr.history[0]["anchor/fallback"] == 1.0 and tr.reuse_anchor is False
    again = _trainer(tmp_path, extra + ["train.iterations=2"], "resume-fallback-2", BatchDependentToy(0))
    again.run_dir = tr.run_dir
    assert again.reuse_anchor is True
    again.load_checkpoint()
    assert again.iteration == 1 and again.reuse_anchor is False  # the resumed run keeps replaying


def test_rollout_anchor_warns_when_the_check_disagrees(tmp_path, caplog):
    tr = _trainer(tmp_path, ["train.anchor=rollout", "train.anchor_check_samples=2"], "roll", BatchDependentToy(0))
    with caplog.at_level(logging.WARNING, logger="flowdppo"):
        m = tr.iteration_step(0)
    assert m["anchor/reused"] == 1.0 and m["replay/logp_abs_diff_max"] > 1e-3
    assert "reused anchor differs from a replay" in caplog.text


def test_reference_kl_subsample_and_interval(tmp_path):
    sched = ["train.ref_kl_every=4", "train.iterations=7", "eval.every=3"]
    sub = make(tmp_path, ["train.anchor=rollout", "train.ref_kl_samples=4", *sched], name="sub")
    calls = {"n": 0}
    orig = sub.model.disable_adapter

    def counted():
        calls["n"] += 1
        return orig()

    sub.model.disable_adapter = counted
    m0 = sub.iteration_step(0)
    assert calls["n"] == len(m0["sde_steps"])  # 4 samples = one micro-batch, one reference forward per step
    assert m0["kl_ref"] == 0.0  # the LoRA starts at the reference policy
    assert {k for k in m0 if k.startswith("kl_ref/")} == {f"kl_ref/step{k}" for k in m0["sde_steps"]}
    # every 4 iterations (0, 4), before each evaluation (after iterations 3 and 6: it 2, 5) and the last (6)
    measured = {it for it in range(1, 7) if "kl_ref" in sub.iteration_step(it)}
    assert measured == {2, 4, 5, 6}
    assert sub._measure_ref_kl(8) and not sub._measure_ref_kl(9)  # the schedule itself, past the run


def test_reference_kl_on_all_samples_is_the_same_with_either_anchor(tmp_path):
    replayed = make(tmp_path, ["train.anchor=replay", "train.ref_kl_samples=0"], name="all-replay")
    reused = make(tmp_path, ["train.anchor=rollout", "train.ref_kl_samples=0"], name="all-reuse")
    for it in range(2):
        a, b = replayed.iteration_step(it), reused.iteration_step(it)
    assert a["kl_ref"] > 0 and a["kl_ref"] == pytest.approx(b["kl_ref"], rel=1e-4)


def test_reference_kl_at_positive_beta_comes_from_the_training_forwards(tmp_path):
    tr = make(tmp_path, ["train.anchor=rollout", "algorithm.beta=0.01"], name="beta")
    calls = {"n": 0}
    orig = tr.model.disable_adapter

    def counted():
        calls["n"] += 1
        return orig()

    tr.model.disable_adapter = counted
    m = tr.iteration_step(0)
    t = tr.cfg.train
    micro_steps = t.prompts_per_iter * t.group_size // t.micro_batch_size * len(m["sde_steps"]) * t.inner_epochs
    assert calls["n"] == micro_steps  # no reference forward outside training
    assert m["kl_ref"] >= 0


def test_anchor_config_is_validated():
    with pytest.raises(ConfigError, match="train.anchor"):
        load_config(overrides=["train.anchor=reuse"])
    with pytest.raises(ConfigError, match="train.ref_kl_samples must be >= 0"):
        load_config(overrides=["train.ref_kl_samples=-1"])

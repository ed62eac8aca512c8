import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowdppo.config import PRESETS, ConfigError, load_config
from flowdppo.training.trainer import Trainer, resume

sys.path.insert(0, str(Path(__file__).parent))
from toy import PROMPTS, ToyModel, brightness_reward  # noqa: E402

BASE = [
    "train.iterations=2",
    "train.prompts_per_iter=4",
    "train.group_size=4",
    "train.minibatch_size=8",
    "train.micro_batch_size=4",
    "train.rollout_batch_size=8",
    "sampling.num_steps=6",
    "eval.every=1",
    "eval.num_prompts=4",
    "reward.weights={bright: 1.0}",
    "log.tensorboard=false",
    "log.checkpoint_every=1",
    "eval.ratio_noise_every=1",
    "eval.ratio_noise_samples=8",
]


def make(tmp_path, extra=(), preset=None, name="run", model_seed=0):
    cfg = load_config(preset=preset, overrides=BASE + list(extra))
    return Trainer(
        cfg,
        model=ToyModel(model_seed),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={"eval": PROMPTS[:4]},
        run_dir=tmp_path / name,
    )


def metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_iterations_write_everything(tmp_path):
    tr = make(tmp_path)
    run_dir = tr.run(progress=False)
    ms = metrics(run_dir)
    assert [m["iteration"] for m in ms] == [0, 1]
    for key in (
        "reward/bright",
        "reward/red",
        "adv/std",
        "ratio_mean",
        "ratio_std",
        "ratio_min",
        "ratio_max",
        "kl_mean",
        "kl_max",
        "kl_above_delta_frac",
        "masked_frac",
        "masked_pos_adv_frac",
        "masked_neg_adv_frac",
        "policy_loss",
        "kl_ref",
        "grad_norm",
        "time/rollout",
        "time/train",
        "reward/zero_std_group_frac",
        "ratio_noise/step0/log_r_std",
    ):
        assert key in ms[0], key
    assert ms[0]["num_optimizer_steps"] == 2  # 16 samples / minibatch 8
    for f in (
        "config.yaml",
        "eval.jsonl",
        "report.md",
        "grid_before.png",
        "grid_after.png",
        "plot_reward.png",
        "checkpoints/latest",
        "adapter/adapter.safetensors",
        "plot_ratio_noise.png",
    ):
        assert (run_dir / f).exists(), f
    assert "Evaluation" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_first_minibatch_ratio_one_and_kl_zero(tmp_path, preset):
    tr = make(tmp_path, ["train.iterations=1", "train.lr=0.05"], preset=preset)
    m = tr.iteration_step(0)
    assert m["first_mb/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["first_mb/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert m["first_mb/kl_max"] == pytest.approx(0.0, abs=1e-12)
    assert m["replay/logp_abs_diff_max"] < 1e-5
    # the second mini-batch sees the update: the policy has moved
    assert m["ratio_max"] > m["first_mb/ratio_max"] or m["ratio_min"] < m["first_mb/ratio_min"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = make(tmp_path, ["train.iterations=3", "train.lr=0.02"], name="full").run(progress=False)
    part = make(tmp_path, ["train.iterations=3", "train.lr=0.02"], name="part")
    part.run(progress=False, stop_after=2)
    assert [m["iteration"] for m in metrics(tmp_path / "part")] == [0, 1]
    resumed = resume(
        tmp_path / "part",
        model=ToyModel(0),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={"eval": PROMPTS[:4]},
    )
    assert resumed.iteration == 2
    resumed.run(progress=False)
    a, b = metrics(full)[2], metrics(tmp_path / "part")[2]
    for k, v in a.items():
        if not k.startswith("time/"):
            assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_inner_epochs_and_beta(tmp_path):
    tr = make(tmp_path, ["train.iterations=1", "train.inner_epochs=2", "algorithm.beta=0.1", "train.lr=0.05"])
    before = {k: v.clone() for k, v in tr.model.adapter_state_dict().items()}
    m = tr.iteration_step(0)
    assert m["num_optimizer_steps"] == 4
    after = tr.model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "kl_ref" in m


def test_learning_raises_the_reward(tmp_path):
    """A wrong sign anywhere (advantage, ratio, loss) would push the reward down instead."""
    cfg = load_config(
        overrides=BASE
        + [
            "train.iterations=12",
            "train.lr=0.03",
            "eval.every=0",
            "log.checkpoint_every=0",
            "eval.ratio_noise_every=0",
            "algorithm.delta=1.0",
        ]
    )
    tr = Trainer(
        cfg,
        model=ToyModel(0),
        reward_fn=brightness_reward,
        prompts=["light a", "light b", "light c"],
        eval_sets={},
        run_dir=tmp_path / "learn",
    )
    tr.run(progress=False)
    r = [m["reward/bright"] for m in metrics(tr.run_dir)]
    first, last = sum(r[:3]) / 3, sum(r[-6:]) / 6
    assert last > first + 0.03, r


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="sampling.sampler.*valid: flow-sde"):
        load_config(overrides=["sampling.sampler=ddim"])
    with pytest.raises(ConfigError, match="minibatch_size"):
        load_config(overrides=["train.prompts_per_iter=3", "train.group_size=5"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="ppo")
    with pytest.raises(ConfigError, match="num_sde_steps"):
        load_config(overrides=["steps.num_sde_steps=6"])


def test_cli_rejects_a_bad_value(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowdppo.cli",
            "train",
            "--set",
            "algorithm.loss=ppo",
            "--set",
            f"log.run_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "algorithm.loss" in r.stderr and "flow-dppo" in r.stderr


def test_uniform_shift_schedule_uses_the_configured_shift(tmp_path):
    from flowdppo.core.sde import uniform_shift_sigmas

    tr = make(tmp_path, ["sampling.schedule=uniform-shift", "sampling.shift=3.0"])
    assert torch.allclose(tr.sigmas, uniform_shift_sigmas(6, 3.0))
    assert tr.kernel.sigma_max == pytest.approx(float(uniform_shift_sigmas(6, 3.0)[1]))


def test_eval_samples_per_prompt_draws_k_fixed_noise_samples_of_each_prompt(tmp_path):
    # k samples of [a, b] are the rows [a, a, b, b] with the same fixed evaluation noise
    cfg = load_config(overrides=BASE + ["eval.samples_per_prompt=2"])
    rep = Trainer(
        cfg,
        model=ToyModel(0),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={"eval": PROMPTS[:2]},
        run_dir=tmp_path / "k2",
    ).evaluate()
    cfg1 = load_config(overrides=BASE + ["eval.samples_per_prompt=1"])
    flat = Trainer(
        cfg1,
        model=ToyModel(0),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={"eval": [p for p in PROMPTS[:2] for _ in range(2)]},
        run_dir=tmp_path / "k1",
    ).evaluate()
    one = Trainer(
        cfg1,
        model=ToyModel(0),
        reward_fn=brightness_reward,
        prompts=PROMPTS,
        eval_sets={"eval": PROMPTS[:2]},
        run_dir=tmp_path / "one",
    ).evaluate()
    assert rep["eval/eval/bright"] == pytest.approx(flat["eval/eval/bright"], abs=1e-6)
    assert rep["eval/eval/bright"] != pytest.approx(one["eval/eval/bright"], abs=1e-6)
    with pytest.raises(ConfigError, match="eval.samples_per_prompt"):
        load_config(overrides=["eval.samples_per_prompt=0"])


def test_same_initial_noise_shares_x1_within_a_group_and_only_there():
    from flowdppo.core.sde import Kernel, uniform_shift_sigmas
    from flowdppo.training.rollout import rollout

    model, sig = ToyModel(0), uniform_shift_sigmas(6, 1.0)
    kernel = Kernel.for_schedule(sig, sampler="flow-sde", eta=0.7)
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]
    gids = torch.arange(3).repeat_interleave(4)
    cond = model.encode_prompts(prompts)

    def run(same, part=None):
        return rollout(
            model,
            kernel,
            prompts,
            gids,
            cond,
            sig,
            [0, 2],
            1.0,
            torch.Generator().manual_seed(7),
            batch_size=5,
            part=part,
            same_initial_noise=same,
        )

    shared, indep = run(True), run(False)
    x1 = shared.latents[:, 0]  # step 0 is an SDE step: its stored latent is the initial noise
    for g in range(3):
        rows = x1[gids == g]
        assert torch.equal(rows, rows[:1].expand_as(rows))
        # the group keeps its first sample's draw; the SDE noise of the trained steps still differs
        assert torch.equal(rows[0], indep.latents[4 * g, 0])
        assert not torch.allclose(shared.next_latents[4 * g, 0], shared.next_latents[4 * g + 1, 0])
    assert not torch.allclose(x1[0], x1[4])
    # a process rolling out a slice that starts mid-group gets the same shared noise
    assert torch.equal(run(True, slice(6, 12)).latents[:, 0], x1[6:12])

"""The policy-gradient signal check: a batch's gradient points where the reward grows; cosine agreement."""

import sys
from pathlib import Path

import pytest
import torch

from flowdppo.config import load_config
from flowdppo.tools.gradsignal import batch_gradient, gradient_agreement
from flowdppo.training.rollout import replay_step
from flowdppo.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import BASE  # noqa: E402
from toy import PROMPTS, ToyModel  # noqa: E402


class LinearDecodeToy(ToyModel):
    """The toy model without the clamp of its decoder, so a brightness reward follows the noise linearly."""

    def decode(self, x):
        return x


def mean_value(prompts, images):
    return {"bright": images.mean(dim=(1, 2, 3))}


def test_batch_gradient_descends_along_the_reward_and_trains_nothing(tmp_path):
    # one SDE step, the last, and one group sharing its initial noise: the reward mean(x_final) is exactly
    # linear in that step's noise, so minus the batch's policy gradient must point where mean(mean_theta)
    # grows (the analytic direction), and a reward that ignores the images must not.
    cfg = load_config(
        overrides=BASE
        + [
            "train.prompts_per_iter=1",
            "train.group_size=64",
            "train.minibatch_size=64",
            "train.micro_batch_size=32",
            "train.rollout_batch_size=64",
            "steps.num_sde_steps=1",
            "steps.start=0.8",
            "steps.end=1.0",
            "sampling.same_initial_noise=true",
        ]
    )
    gen = torch.Generator().manual_seed(0)

    def noise_reward(prompts, images):
        return {"bright": torch.randn(len(prompts), generator=gen)}

    def direction(reward_fn, name):
        tr = Trainer(
            cfg, model=LinearDecodeToy(0), reward_fn=reward_fn, prompts=PROMPTS, eval_sets={}, run_dir=tmp_path / name
        )
        before = [p.detach().clone() for p in tr.params]
        g, metrics = batch_gradient(tr, 0, prompt_iteration=0)
        assert all(torch.equal(a, b) for a, b in zip(before, tr.params)) and all(p.grad is None for p in tr.params)
        traj, _, _, _ = tr.collect(0, 0)
        replay_step(tr.model, tr.kernel, traj, torch.arange(len(traj)), 0, 1.0).mean.mean().backward()
        s = torch.cat([p.grad.flatten() for p in tr.params])
        return float(torch.nn.functional.cosine_similarity(-g, s, dim=0))

    assert direction(mean_value, "bright") > 0.5
    assert abs(direction(noise_reward, "noise")) < 0.3


def test_gradient_agreement_of_known_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert gradient_agreement([a, a, a])[0] == pytest.approx(1.0)
    assert gradient_agreement([a, b])[0] == pytest.approx(0.0)
    assert gradient_agreement([a, -a])[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_agreement([a])


def test_per_category_gradients_sum_to_the_batch_gradient_and_zero_variance_groups_are_counted(tmp_path):
    from flowdppo.tools.gradsignal import zero_variance_groups

    prompts = ["a circle", "two squares", "a red circle", "a circle to the left of a square"]
    cfg = load_config(overrides=BASE + ["steps.num_sde_steps=2"])

    def reward(ps, images):  # the counting prompt's group gets a constant reward: no signal
        r = images.mean(dim=(1, 2, 3))
        return {"bright": torch.where(torch.tensor([p == "two squares" for p in ps]), torch.zeros_like(r), r)}

    tr = Trainer(cfg, model=ToyModel(0), reward_fn=reward, prompts=prompts, eval_sets={}, run_dir=tmp_path / "r")
    whole, _ = batch_gradient(tr, 0, prompt_iteration=0)
    flat, _, by_cat, zero = batch_gradient(tr, 0, prompt_iteration=0, per_category=True)
    assert torch.allclose(flat, whole, atol=1e-5 * float(whole.abs().max()))
    assert set(by_cat) == {"single_object", "counting", "colors", "position"}  # 4 prompts per iteration: all
    assert torch.allclose(torch.stack(list(by_cat.values())).sum(0), whole, atol=1e-5 * float(whole.abs().max()))
    assert zero["counting"] == [1, 1] and float(by_cat["counting"].abs().max()) == 0.0
    for c, (z, n) in zero.items():
        assert 0 <= z <= n and (c == "counting" or z == 0)
    # the helper alone
    gids = torch.tensor([0, 0, 1, 1])
    got = zero_variance_groups(
        ["a circle"] * 2 + ["not a grammar prompt"] * 2, gids, torch.tensor([0.0, 0.0, 1.0, -1.0])
    )
    assert got == {"single_object": [1, 1], "other": [0, 1]}

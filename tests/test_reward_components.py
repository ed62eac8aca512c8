"""Several rewards at once: components by name or import path, GDPO, shared instances, eval rewards."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import custom_components  # noqa: E402
from flowdppo.config import ConfigError, load_config  # noqa: E402
from flowdppo.rewards.multi import build_multi  # noqa: E402
from flowdppo.training.trainer import Trainer  # noqa: E402

TINY = {
    "train": {
        "iterations": 2,
        "prompts_per_iter": 4,
        "group_size": 4,
        "minibatch_size": 8,
        "micro_batch_size": 4,
        "rollout_batch_size": 8,
        "log_ref_kl": False,
    },
    "sampling": {"num_steps": 6},
    "eval": {"every": 1, "num_prompts": 4, "ratio_noise_every": 0},
    "log": {"tensorboard": False, "checkpoint_every": 1},
    "model": {"family": "custom_components:toy_family"},
}


def test_two_components_under_gdpo_train_two_iterations_and_evaluate_on_others(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bright square\ndark night\na bright sun\ndark cave\n")
    bright = {"name": "custom_components:scaled_brightness", "args": {"scale": 2.0}}
    cfg_file = tmp_path / "multi.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                **TINY,
                "algorithm": {"multi_reward": "gdpo"},
                "reward": {
                    "components": [{**bright, "weight": 1.0}, {"name": "jpeg", "weight": 0.5}],
                    "eval_components": [bright],
                },
                "train": {**TINY["train"], "prompts_file": str(prompts)},
                "eval": {**TINY["eval"], "prompts_file": str(prompts)},
            }
        )
    )
    cfg = load_config(str(cfg_file))
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    # the brightness component of training and of evaluation is one instance
    assert trainer.eval_reward_fn.parts[0][1] is trainer.reward_fn.parts[0][1]
    run_dir = trainer.run(progress=False)
    ms = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in ms] == [0, 1]
    assert trainer.reward_fn.weights == {"lumen": 1.0, "jpeg": 0.5}
    for m in ms:  # every component logged; GDPO advantages are normalised per key, then summed
        assert {"reward/lumen", "reward/jpeg", "reward/total"} <= set(m)
        assert m["reward/total"] == pytest.approx(m["reward/lumen"] + 0.5 * m["reward/jpeg"], rel=1e-4, abs=1e-6)
    evals = [json.loads(ln) for ln in (run_dir / "eval.jsonl").read_text().splitlines()]
    keys = set().union(*evals)
    assert any(k.endswith("/lumen") for k in keys) and not any(k.endswith("/jpeg") for k in keys)


def test_labels_weights_and_collisions():
    two = build_multi(
        [
            {"name": "custom_components:scaled_brightness", "label": "a", "weight": 2.0},
            {"name": "custom_components:scaled_brightness", "args": {"scale": -1.0}, "label": "b"},
        ]
    )
    images = torch.rand(3, 3, 4, 4)
    out = two(["x", "y", "z"], images)
    torch.testing.assert_close(out["b"], -out["a"])
    assert two.weights == {"a": 2.0, "b": 1.0}
    same = build_multi(["custom_components:scaled_brightness", "custom_components:scaled_brightness"])
    with pytest.raises(ValueError, match="both return 'lumen'; give one of them a 'label'"):
        same(["x"], images[:1])
    with pytest.raises(ValueError, match="weights name \\['nope'\\]"):
        build_multi([{"name": "custom_components:scaled_brightness", "weights": {"nope": 1.0}}])(["x"], images[:1])


@pytest.mark.parametrize(
    "components, message",
    [
        ([{"args": {}}], r"reward.components\[0\] must be a mapping with a 'name'"),
        ([{"name": "jpeg", "wieght": 1}], r"reward.components\[0\] has unknown keys \['wieght'\]"),
        ([{"name": "jpeg", "weight": float("nan")}], r"reward.components\[0\].weight must be a finite number"),
        ([{"name": "no_such_reward"}], r"reward.components\[0\].name: unknown reward 'no_such_reward'"),
    ],
)
def test_bad_components_are_one_line_config_errors(components, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"reward.components={json.dumps(components)}"])


def test_same_weights_share_one_loaded_model(tmp_path):
    pytest.importorskip("transformers")
    from tiny_rewards import save_tiny_clip

    folder = str(save_tiny_clip(tmp_path / "clip"))
    multi = build_multi(
        [
            {"name": "pickscore", "args": {"model": folder, "processor": folder, "device": "cpu"}},
            {
                "name": "pickscore",
                "args": {"model": folder, "processor": folder, "device": "cpu", "scale": 1.0},
                "label": "raw",
            },
        ],
    )
    (_, a), (_, b) = multi.parts
    assert a is not b and a.model is b.model
    out = multi(["a red cube"], torch.rand(1, 3, 32, 32))
    torch.testing.assert_close(out["raw"], out["pickscore"] * 26)
    assert custom_components  # imported for its import-path components

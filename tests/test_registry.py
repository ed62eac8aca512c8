"""Open registries: a reward, a trust region and a model family from a test-only module, by import path."""

import json
import logging

import pytest
import yaml

import custom_components
from flowdppo.config import ConfigError, load_config, load_run_config
from flowdppo.core.losses import LOSSES
from flowdppo.core.sde import SAMPLERS, Kernel
from flowdppo.models import MODEL_FAMILIES
from flowdppo.registry import Registry, RegistryError, is_import_path
from flowdppo.rewards import REWARDS
from flowdppo.training.trainer import Trainer

TINY = {
    "train": {
        "iterations": 2,
        "prompts_per_iter": 4,
        "group_size": 4,
        "minibatch_size": 8,
        "micro_batch_size": 4,
        "rollout_batch_size": 8,
    },
    "sampling": {"num_steps": 6},
    "eval": {"every": 1, "num_prompts": 4, "ratio_noise_every": 0},
    "log": {"tensorboard": False, "checkpoint_every": 1},
}


def test_components_by_import_path_train_two_iterations(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bright square\ndark night\na bright sun\ndark cave\n")
    cfg_file = tmp_path / "custom.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                **TINY,
                "model": {"family": "custom_components:toy_family", "args": {"seed": 3}},
                "reward": {
                    "name": "custom_components:scaled_brightness",
                    "args": {"scale": 2.0},
                    "weights": {"lumen": 1.0},
                },
                "algorithm": {"loss": "custom_components:CAPPED", "loss_args": {"cap": 1.5}},
                "train": {**TINY["train"], "prompts_file": str(prompts), "log_ref_kl": False},
                "eval": {**TINY["eval"], "prompts_file": str(prompts)},
            }
        )
    )
    calls = dict(custom_components.CALLS)
    cfg = load_config(str(cfg_file))
    run_dir = Trainer(cfg, run_dir=tmp_path / "run").run(progress=False)
    ms = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in ms] == [0, 1]
    # each component was the one used: the model built once, the reward scored, the loss computed
    assert custom_components.CALLS["model"] == calls["model"] + 1
    assert custom_components.CALLS["reward"] > calls["reward"]
    assert custom_components.CALLS["loss"] > calls["loss"]
    assert all("capped_frac" in m and "reward/lumen" in m for m in ms)
    # the trust region declared a reference pass: KL to the reference reaches the loss at beta = 0
    # (the anchor's own reference KL is off: log_ref_kl=false)
    assert all("kl_ref" in m for m in ms)
    # the run's config resolves again (resume reads it)
    assert load_run_config(str(run_dir)).algorithm.loss == "custom_components:CAPPED"


@pytest.mark.parametrize(
    "override,key",
    [
        ("reward.name=aesthetics", "reward.name"),
        ("algorithm.loss=ppo", "algorithm.loss"),
        ("sampling.sampler=euler", "sampling.sampler"),
        ("model.family=sdxl", "model.family"),
        ("train.world=lego", "train.world"),
    ],
)
def test_unknown_name_lists_registered_and_import_path(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert msg.startswith(key) and "valid:" in msg and "import path" in msg
    assert "\n" not in msg


def test_bad_import_paths_are_one_clear_line():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_config(overrides=["reward.name=no_such_module:fn"])
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_config(overrides=["algorithm.loss=custom_components:nope"])
    with pytest.raises(ConfigError, match="not a TrustRegion"):
        load_config(overrides=["algorithm.loss=custom_components:CALLS"])


def test_registries_list_builtins():
    assert set(LOSSES) == {"flow-dppo", "clip", "grpo-guard", "dppo-symmetric", "unclipped"}
    assert set(SAMPLERS) == {"flow-sde", "cps", "dance", "ode"}
    assert {"shapes", "sd3", "flux"} <= set(MODEL_FAMILIES)
    assert {"shapes", "http"} <= set(REWARDS)
    assert LOSSES.get("grpo-guard").needs_means and not LOSSES.get("flow-dppo").needs_means
    assert LOSSES.get("flow-dppo").uses == ("delta",)


def test_registry_mechanics():
    reg: Registry[int] = Registry("thing", "x.thing")
    reg.register("one", 1)

    @reg.register("two")
    def two():
        return 2

    assert reg.get("one") == 1 and reg.get("two") is two and len(reg) == 2
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("one", 5)
    reg.register("one", 5, replace=True)
    assert reg.get("one") == 5
    with pytest.raises(RegistryError, match="may not contain ':'"):
        reg.register("a:b", 1)
    assert reg.get("custom_components:CALLS") is custom_components.CALLS
    assert is_import_path("a.b:c") and is_import_path("a:B.c") and not is_import_path("a") and not is_import_path(":c")


def test_a_registered_sampler_is_used_by_the_kernel():
    import torch

    from flowdppo.core.sde import Sampler, flow_sde_step

    calls = []

    def step(*a, **k):
        calls.append(1)
        return flow_sde_step(*a, **k)

    SAMPLERS.register("test-traced", Sampler(step=step, std=SAMPLERS.get("flow-sde").std))
    try:
        k = Kernel(sampler="test-traced", eta=0.7, sigma_max=0.96)
        ref = Kernel(sampler="flow-sde", eta=0.7, sigma_max=0.96)
        v, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        a, b = k.step(v, x, 0.8, 0.7, generator=g1), ref.step(v, x, 0.8, 0.7, generator=g2)
        assert calls and torch.equal(a.x_next, b.x_next) and torch.equal(a.log_prob, b.log_prob)
        assert torch.equal(k.std(0.8, 0.7), ref.std(0.8, 0.7))
    finally:
        SAMPLERS._entries.pop("test-traced")


def test_ignored_knobs_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="flowdppo"):
        load_config(preset="flow-grpo", overrides=["algorithm.delta=1e-6"])
        load_config(preset="flow-dppo", overrides=["algorithm.clip_eps=0.2", "sampling.shift=2.0"])
    text = caplog.text
    assert "algorithm.delta=1e-06 is ignored by algorithm.loss=clip" in text
    assert "algorithm.clip_eps=0.2 is ignored by algorithm.loss=flow-dppo" in text
    assert "sampling.shift=2.0 is ignored" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowdppo"):
        load_config(preset="grpo-guard")  # its clip_eps 4e-6 is read by grpo-guard: no warning
        load_config(overrides=["sampling.schedule=uniform-shift", "sampling.shift=2.0"])
    assert "ignored" not in caplog.text


def test_renamed_advantage_clip_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="flowdppo"):
        cfg = load_config(overrides=["algorithm.adv_clip=3", "algorithm.advantage_clip=2"])
    assert cfg.algorithm.loss_adv_clip == 3 and cfg.algorithm.norm_adv_clip == 2
    assert "algorithm.adv_clip was renamed to algorithm.loss_adv_clip" in caplog.text
    with pytest.raises(ConfigError, match="give only algorithm.loss_adv_clip"):
        load_config(overrides=["algorithm.adv_clip=3", "algorithm.loss_adv_clip=2"])

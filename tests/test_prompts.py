"""Prompt sourcing (flowdppo.training.prompts) and the world interface (flowdppo.worlds.world)."""

import sys
from pathlib import Path

import pytest
import torch

from flowdppo.config import ConfigError, load_config
from flowdppo.training.prompts import prompt_source
from flowdppo.training.trainer import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_trainer import BASE  # noqa: E402
from toy import ToyModel, brightness_reward  # noqa: E402


class LightDarkWorld:
    """A world that lives only in the test folder, named by import path."""

    def prompt_sets(self):
        return {"train": ["light a", "light b", "dark a"], "held": ["light c", "dark c", "dark d"]}

    def breakdown(self, prompts, scores):
        kinds = [p.split()[0] for p in prompts]
        sel = {k: torch.tensor([x == k for x in kinds]) for k in set(kinds)}
        return {f"bright/{k}": float(scores["bright"][m].mean()) for k, m in sel.items()}


WORLD = ["train.world=test_prompts:LightDarkWorld", "eval.sets=[held]"]


def test_a_world_by_import_path_supplies_prompts_and_its_breakdown(tmp_path):
    cfg = load_config(overrides=BASE + WORLD)
    tr = Trainer(cfg, model=ToyModel(0), reward_fn=brightness_reward, run_dir=tmp_path / "w")
    assert tr.train_prompts == ["light a", "light b", "dark a"]
    assert tr.eval_sets == {"held": ["light c", "dark c", "dark d"][: cfg.eval.num_prompts]}
    res = tr.evaluate()
    assert {"eval/held/bright", "eval/held/bright/light", "eval/held/bright/dark"} <= set(res)
    # the breakdown is the per-kind mean of the same scores: 1 light and 2 dark prompts, 4 samples each
    overall = (res["eval/held/bright/light"] + 2 * res["eval/held/bright/dark"]) / 3
    assert overall == pytest.approx(res["eval/held/bright"], abs=1e-6)


def test_files_and_arguments_take_precedence_and_the_breakdown_follows_the_world(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("light x\n\n  dark y \n")
    cfg = load_config(overrides=BASE + WORLD + [f"train.prompts_file={train}"])
    src = prompt_source(cfg)
    assert src.train == ["light x", "dark y"]
    assert src.eval_sets == {} and src.breakdown is None  # own training prompts, no evaluation prompts
    src = prompt_source(cfg, eval_sets={"mine": ["light q"]})
    assert src.eval_sets == {"mine": ["light q"]} and src.breakdown is None
    src = prompt_source(load_config(overrides=BASE + WORLD))
    assert src.breakdown is not None and list(src.eval_sets) == ["held"]


def test_bad_world_inputs_name_the_key():
    with pytest.raises(ConfigError, match=r"train.world: unknown world 'nope'; valid: shapes, or an import path"):
        prompt_source(load_config(overrides=["train.world=nope"]))
    with pytest.raises(ConfigError, match="train.world: cannot import module 'no_such_mod'"):
        prompt_source(load_config(overrides=["train.world=no_such_mod:W"]))
    with pytest.raises(ConfigError, match="train.prompt_split 'dev' is not valid; valid: train, eval, ood"):
        prompt_source(load_config(overrides=["train.prompt_split=dev"]))
    with pytest.raises(ConfigError, match="eval.sets: 'test' is not valid"):
        prompt_source(load_config(overrides=["eval.sets=[eval, test]"]))
    with pytest.raises(ConfigError, match="train.prompts_file is required when train.world is null"):
        prompt_source(load_config(overrides=["train.world=null"]))


def test_the_shapes_world_default_and_its_per_category_breakdown():
    src = prompt_source(load_config(overrides=["eval.num_prompts=12"]))
    assert len(src.train) == 600 and list(src.eval_sets) == ["eval", "ood"]
    assert all(len(v) == 12 for v in src.eval_sets.values())
    prompts = src.eval_sets["eval"]
    strict = torch.arange(len(prompts)).remainder(2).float()
    out = src.breakdown(prompts, {"strict": strict, "soft": strict})
    assert len(out) >= 5 and all(k.startswith("strict/") for k in out)
    assert src.breakdown(prompts, {"soft": strict}) == {}


def test_nothing_in_training_names_a_world():
    for path in (HERE.parent / "src" / "flowdppo" / "training").glob("*.py"):
        text = path.read_text()
        assert "worlds.shapes" not in text and "shapes_world" not in text, path


class KindWorld(LightDarkWorld):
    """LightDarkWorld with categories (the first word of a prompt)."""

    def categories(self):
        return ["light", "dark"]

    def category(self, prompt):
        return prompt.split()[0]


KINDS = ["train.world=test_prompts:KindWorld", "eval.sets=[held]"]


def test_category_weights_set_each_prompts_draw_probability(tmp_path):
    src = prompt_source(load_config(overrides=BASE + KINDS + ["train.category_weights={dark: 4.0}"]))
    assert src.train_probs == pytest.approx([1 / 6, 1 / 6, 4 / 6])  # "dark a" weighs 4, each light prompt 1
    assert prompt_source(load_config(overrides=BASE + KINDS)).train_probs is None  # the default: uniform
    # the trainer draws with them: with light weighed 0, only the dark prompt is ever chosen
    cfg = load_config(overrides=BASE + KINDS + ["train.category_weights={light: 0.0}"])  # 4 draws with replacement
    tr = Trainer(cfg, model=ToyModel(0), reward_fn=brightness_reward, run_dir=tmp_path / "k")
    seen = set()
    for it in range(6):
        traj, *_ = tr.collect(it)
        seen |= set(traj.prompts)
    assert seen == {"dark a"}


def test_bad_category_weights_name_the_key():
    with pytest.raises(ConfigError, match=r"train.category_weights: 'grey' is not a category; valid: light, dark"):
        prompt_source(load_config(overrides=BASE + KINDS + ["train.category_weights={grey: 1.0}"]))
    with pytest.raises(ConfigError, match=r"category_weights.dark=-1.0 is not valid; valid: a finite number >= 0"):
        load_config(overrides=BASE + KINDS + ["train.category_weights={dark: -1}"])
    with pytest.raises(ConfigError, match="leave 1 training prompts with a weight > 0, fewer than the 2 an iteration"):
        few = ["train.category_weights={light: 0.0}", "train.prompts_per_iter=2"]
        prompt_source(load_config(overrides=BASE + KINDS + few))
    with pytest.raises(ConfigError, match="has no prompt categories"):
        prompt_source(load_config(overrides=BASE + WORLD + ["train.category_weights={light: 2.0}"]))
    with pytest.raises(ConfigError, match="cannot be used with train.prompts_file"):
        prompt_source(load_config(overrides=BASE + KINDS + ["train.category_weights={light: 2.0}"]), prompts=["x"])

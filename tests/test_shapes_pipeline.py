"""The embedded default end to end: shapes world + shapes model + shapes reward through the trainer."""

import json

import pytest

from flowdppo.config import PRESETS, load_config
from flowdppo.models.shapes_model import ShapesFlowModel
from flowdppo.training.trainer import Trainer

TINY = {"num_layers": 2, "num_heads": 2, "head_dim": 8, "text_dim": 16, "text_layers": 1, "text_heads": 2}
SMALL_RUN = [
    "train.iterations=2",
    "train.prompts_per_iter=2",
    "train.group_size=4",
    "train.minibatch_size=4",
    "train.micro_batch_size=4",
    "sampling.num_steps=6",
    "eval.every=1",
    "eval.num_prompts=6",
    "eval.grid_prompts=2",
    "log.tensorboard=false",
    "log.checkpoint_every=1",
    "eval.ratio_noise_samples=4",
    "reward.weights={soft: 1.0, strict: 0.5}",
]


def tiny_model():
    m = ShapesFlowModel.from_config(TINY, seed=0)
    m.add_lora(4, 8.0)
    return m


def test_default_pipeline_two_iterations(tmp_path):
    cfg = load_config(overrides=SMALL_RUN)
    tr = Trainer(cfg, model=tiny_model(), run_dir=tmp_path / "run")
    run_dir = tr.run(progress=False)
    ms = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2
    assert {"reward/strict", "reward/soft", "eval/eval/strict", "eval/ood/strict"} <= set(ms[-1])
    cats = [k for k in ms[-1] if k.startswith("eval/eval/strict/")]
    assert len(cats) >= 5  # per-category accuracy
    assert ms[0]["first_mb/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert ms[0]["first_mb/kl_max"] == pytest.approx(0.0, abs=1e-12)
    assert (run_dir / "report.md").exists() and (run_dir / "grid_after.png").exists()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_starts_at_ratio_one(tmp_path, preset):
    cfg = load_config(
        preset=preset, overrides=SMALL_RUN + ["train.iterations=1", "eval.every=0", "eval.ratio_noise_every=0"]
    )
    tr = Trainer(cfg, model=tiny_model(), run_dir=tmp_path / preset)
    m = tr.iteration_step(0)
    assert m["first_mb/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["first_mb/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert m["first_mb/kl_max"] == pytest.approx(0.0, abs=1e-12)

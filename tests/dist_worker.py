"""What tests/test_distributed.py launches on 2 CPU processes (gloo), with torchrun or accelerate launch.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py MODE OUT_DIR [key=value ...]

Modes (each process writes ``OUT_DIR/rank<r>.pt``):

- ``step``: one iteration of the toy LoRA model (DDP); dumps the world size, the advantages, the
  gathered rewards and the trained weights;
- ``resume``: the toy model for ``train.iterations`` uninterrupted (``full``) and stopped after one
  iteration then resumed (``part``), both under this process group;
- ``fsdp2``: the embedded shapes model (tiny random config), full fine-tuning sharded with FSDP2,
  trained with ``Trainer.run`` and checkpointed; then resumed from the checkpoint on the same
  processes for one more iteration.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from flowdppo.config import load_config  # noqa: E402
from flowdppo.training.trainer import Trainer, resume  # noqa: E402
from toy import PROMPTS, ToyModel, brightness_reward  # noqa: E402

# the shapes model's word vocabulary for the toy prompts (tests build it with random weights)
TINY_SHAPES = {
    "num_layers": 2,
    "num_heads": 2,
    "head_dim": 8,
    "text_dim": 16,
    "text_layers": 1,
    "text_heads": 2,
    "max_tokens": 4,
    "vocab": ["light", "dark", "a", "b", "c", "d", "e", "f"],
}


def tiny_shapes(seed: int = 0):
    from flowdppo.models.shapes_model import ShapesFlowModel

    m = ShapesFlowModel.from_config(TINY_SHAPES, seed=seed)
    m.enable_full_finetune()
    return m


def capture_advantages(tr: Trainer, box: list) -> None:
    orig = tr.advantages

    def wrapped(prompts, group_ids, rewards):
        adv, m = orig(prompts, group_ids, rewards)
        box.append({"adv": adv.clone(), "rewards": {k: v.clone() for k, v in rewards.items()}})
        return adv, m

    tr.advantages = wrapped


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    overrides = argv[2:]
    cfg = load_config(overrides=overrides)
    dump: dict = {}
    if mode == "step":
        tr = Trainer(
            cfg, model=ToyModel(0), reward_fn=brightness_reward, prompts=PROMPTS, eval_sets={}, run_dir=out / "run"
        )
        box: list = []
        capture_advantages(tr, box)
        dump["metrics"] = tr.iteration_step(0)
        dump.update(box[0])
        dump["params"] = tr.model.adapter_state_dict()
    elif mode == "resume":
        kw = dict(reward_fn=brightness_reward, prompts=PROMPTS, eval_sets={"eval": PROMPTS[:3]})
        full = Trainer(cfg, model=ToyModel(0), run_dir=out / "full", **kw)
        full.run(progress=False)
        dump["full_params"] = full.model.adapter_state_dict()
        part = Trainer(cfg, model=ToyModel(0), run_dir=out / "part", **kw)
        part.run(progress=False, stop_after=1)
        resumed = resume(out / "part", model=ToyModel(0), **kw)
        dump["resumed_at"] = resumed.iteration
        resumed.run(progress=False)
        dump["params"] = resumed.model.adapter_state_dict()
    elif mode == "fsdp2":
        kw = dict(reward_fn=brightness_reward, prompts=PROMPTS, eval_sets={"eval": PROMPTS[:3]})
        tr = Trainer(cfg, model=tiny_shapes(0), run_dir=out / "run", **kw)
        dump["sharded"] = [
            type(tr.model.module).__name__,
            type(tr.model.module.transformer.transformer_blocks[0]).__name__,
            type(tr.model.module.text_encoder).__name__,
        ]
        dump["local_numel"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in tr.params)
        tr.run(progress=False)
        dump["params"] = tr.dist.full_state(tr.model, tr.params)  # rank 0: full weights; others: None
        # resume on the same processes (weights and optimizer state into the shards), one more iteration
        again = resume(out / "run", overrides=["train.iterations=3"], model=tiny_shapes(0), **kw)
        dump["resumed_params"] = again.dist.full_state(again.model, again.params)
        again.run(progress=False)
        dump["params_after_resume"] = again.dist.full_state(again.model, again.params)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dump["rank"], dump["world"] = dist.get_rank(), dist.get_world_size()
    torch.save(dump, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

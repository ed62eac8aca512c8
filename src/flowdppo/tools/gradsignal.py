"""How much signal does one rollout batch carry? Policy-gradient agreement between independent batches.

The policy gradient of a batch is ``-sum_i A_i grad log pi(x_i)`` over its trained steps. If the reward
barely depends on the injected noise (or depends on it very non-linearly), this is mostly noise and
two batches' gradients point in unrelated directions. The mean pairwise cosine of the gradients of
``n`` independent batches estimates ``|E g|^2 / E|g|^2``: about 0 = the batch is noise, 1 = every batch
agrees. It says whether a reward, a batch size or a step selection can teach the model anything
before a long run is spent on it::

    python -m flowdppo.tools.gradsignal --batches 6 --same-prompts
    python -m flowdppo.tools.gradsignal --set "reward.weights={quality: 1.0, strict: 0.0, soft: 0.0}"

The gradients are taken at the current weights with the ratio at 1 (the first mini-batch of every
loss), so the loss choice does not matter; no weight is changed. One process only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
from collections.abc import Sequence

import torch

from flowdppo.training.rollout import replay_step


def batch_gradient(trainer, it: int, prompt_iteration: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The flattened policy gradient of iteration ``it``'s batch (``trainer.collect``) at the current
    weights, summed over its samples and trained steps; and the batch's reward metrics."""
    traj, adv, metrics, _ = trainer.collect(it, prompt_iteration)
    params = list(trainer.params)
    for p in params:
        p.grad = None
    g = trainer.cfg.sampling.guidance_scale
    adv = adv.to(trainer.model.device)
    trainer.model.module.eval()
    for micro in torch.arange(len(traj)).split(trainer.cfg.train.micro_batch_size):
        for j in range(len(traj.sde_steps)):
            lp = replay_step(trainer.model, trainer.kernel, traj, micro, j, g).log_prob
            (-(adv[micro] * torch.exp(lp - lp.detach())).sum()).backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float().cpu() for p in params])
    for p in params:
        p.grad = None
    return flat, metrics


def gradient_agreement(grads: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Mean pairwise cosine of ``grads`` and its standard error (over the pairs)."""
    if len(grads) < 2:
        raise ValueError(f"gradient_agreement needs at least 2 gradients, got {len(grads)}")
    cos = torch.tensor(
        [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    )
    sem = float(cos.std()) / math.sqrt(len(cos)) if len(cos) > 1 else float("nan")
    return float(cos.mean()), sem


def main(argv: list[str] | None = None) -> int:
    from flowdppo.config import load_config
    from flowdppo.training.trainer import Trainer

    ap = argparse.ArgumentParser(prog="python -m flowdppo.tools.gradsignal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML config (as for flowdppo train)")
    ap.add_argument("--preset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=6, help="independent batches (>= 2)")
    ap.add_argument("--same-prompts", action="store_true", help="every batch draws the prompts of iteration 0")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.batches < 2:
        ap.error(f"--batches must be >= 2, got {a.batches}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config, preset=a.preset, overrides=["log.tensorboard=false"] + a.set)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, run_dir=tmp)
        grads, rewards = [], []
        for it in range(a.batches):
            g, m = batch_gradient(trainer, it, 0 if a.same_prompts else None)
            grads.append(g)
            rewards.append(m)
    mean, sem = gradient_agreement(grads)
    out = {
        "agreement": mean,
        "agreement_sem": sem,
        "batches": a.batches,
        "batch_size": cfg.train.prompts_per_iter * cfg.train.group_size,
        "same_prompts": a.same_prompts,
        "grad_norm_mean": float(torch.stack([g.norm() for g in grads]).mean()),
    }
    for k in rewards[0]:
        if k.startswith("reward/"):
            out[k] = sum(r[k] for r in rewards) / len(rewards)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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


def prompt_category(prompt: str) -> str:
    """The shapes world's category of ``prompt`` (``"other"`` for a prompt outside its grammar)."""
    from flowdppo.worlds import shapes

    try:
        return shapes.parse_prompt(prompt).category
    except ValueError:
        return "other"


def zero_variance_groups(prompts: Sequence[str], group_ids: torch.Tensor, adv: torch.Tensor) -> dict[str, list[int]]:
    """Per category: ``[groups whose advantages are all 0 (no signal), groups]``."""
    out: dict[str, list[int]] = {}
    for gid in torch.unique(group_ids).tolist():
        idx = (group_ids == gid).nonzero().flatten()
        c = out.setdefault(prompt_category(prompts[int(idx[0])]), [0, 0])
        c[0] += int(bool((adv[idx].abs() < 1e-8).all()))
        c[1] += 1
    return out


def batch_gradient(
    trainer, it: int, prompt_iteration: int | None = None, per_category: bool = False
) -> tuple[torch.Tensor, dict[str, float]] | tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor], dict]:
    """The flattened policy gradient of iteration ``it``'s batch (``trainer.collect``) at the current
    weights, summed over its samples and trained steps; and the batch's reward metrics.

    ``per_category``: also the gradient of each shapes category's samples alone (the advantages of the
    others masked; the categories' gradients sum to the whole) and :func:`zero_variance_groups`."""
    traj, adv, metrics, _ = trainer.collect(it, prompt_iteration)
    params = list(trainer.params)
    for p in params:
        p.grad = None
    g = trainer.cfg.sampling.guidance_scale
    adv = adv.to(trainer.model.device)
    cats = [prompt_category(p) for p in traj.prompts]
    by_cat: dict[str, torch.Tensor] = {}
    trainer.model.module.eval()
    for micro in torch.arange(len(traj)).split(trainer.cfg.train.micro_batch_size):
        for j in range(len(traj.sde_steps)):
            lp = replay_step(trainer.model, trainer.kernel, traj, micro, j, g).log_prob
            terms = adv[micro] * torch.exp(lp - lp.detach())
            if not per_category:
                (-terms.sum()).backward()
                continue
            present = sorted({cats[i] for i in micro.tolist()})
            for k, c in enumerate(present):
                mask = torch.tensor([cats[i] == c for i in micro.tolist()], device=terms.device)
                grads = torch.autograd.grad(
                    -(terms * mask).sum(), params, retain_graph=k < len(present) - 1, allow_unused=True
                )
                flat_c = torch.cat(
                    [
                        (q if q is not None else torch.zeros_like(p)).flatten().float().cpu()
                        for q, p in zip(grads, params)
                    ]
                )
                by_cat[c] = by_cat[c] + flat_c if c in by_cat else flat_c
    if per_category:
        flat = torch.stack(list(by_cat.values())).sum(0)
        return flat, metrics, by_cat, zero_variance_groups(traj.prompts, traj.group_ids, adv.cpu())
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
    ap.add_argument(
        "--per-category",
        action="store_true",
        help="also the agreement of each shapes category's own gradient and its share of zero-variance groups",
    )
    a = ap.parse_args(argv)
    if a.batches < 2:
        ap.error(f"--batches must be >= 2, got {a.batches}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config, preset=a.preset, overrides=["log.tensorboard=false"] + a.set)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, run_dir=tmp)
        grads, rewards, cat_grads, zero = [], [], {}, {}
        for it in range(a.batches):
            res = batch_gradient(trainer, it, 0 if a.same_prompts else None, per_category=a.per_category)
            grads.append(res[0])
            rewards.append(res[1])
            if a.per_category:
                for c, gc in res[2].items():
                    cat_grads.setdefault(c, []).append(gc)
                for c, (z, n) in res[3].items():
                    zz = zero.setdefault(c, [0, 0])
                    zz[0] += z
                    zz[1] += n
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
    if a.per_category:
        out["per_category"] = {
            c: {
                "agreement": gradient_agreement(gs)[0] if len(gs) > 1 else None,
                "agreement_sem": gradient_agreement(gs)[1] if len(gs) > 1 else None,
                "batches": len(gs),
                "zero_variance_groups": zero.get(c, [0, 0])[0],
                "groups": zero.get(c, [0, 0])[1],
            }
            for c, gs in sorted(cat_grads.items())
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

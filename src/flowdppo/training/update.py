"""The policy update: the frozen anchor (step 3 of an iteration) and one mini-batch step (step 4).

Both replay the stored SDE steps through :func:`flowdppo.training.rollout.replay_step`, the kernel
call that sampled them, so sampling and training share every formula. :func:`anchor` runs without
gradients in the micro-batches of the first epoch, so the first mini-batch starts at ratio 1 and KL 0.
:func:`minibatch_step` back-propagates each step's loss (summed entries / the whole mini-batch's
entry count, so the update is the same on 1 or N processes) as soon as it is computed, steps the
optimizer once, and returns the metrics of the whole mini-batch from the same pure loss function.
See docs/flow-dppo.md, sections "Losses" and "One iteration".
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch

from flowdppo.config import Config
from flowdppo.core.losses import LossInputs, LossSpec, policy_loss, reduce_loss
from flowdppo.core.sde import Kernel
from flowdppo.core.steps import StepSelection
from flowdppo.models.base import FlowModel
from flowdppo.training.distributed import Dist
from flowdppo.training.rollout import Trajectories, replay_step

log = logging.getLogger("flowdppo")


def prepare_optimizer(model: FlowModel, dist: Dist, cfg: Config) -> tuple[list, Any]:
    """AdamW over the trainable parameters, wrapped for the sharding in use (``dist.prepare``)."""
    t = cfg.train
    n_sde = len(StepSelection(**asdict(cfg.steps)).select(cfg.sampling.num_steps, t.seed, 0))
    # backward passes per optimizer step on one process (DeepSpeed's accumulation count)
    micro_steps = math.ceil(t.minibatch_size // dist.world / t.micro_batch_size) * n_sde

    def make(ps):
        return torch.optim.AdamW(ps, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)

    return dist.prepare(model, t.sharding, make, micro_steps=micro_steps, grad_clip=t.grad_clip)


@torch.no_grad()
def anchor(
    model: FlowModel, kernel: Kernel, dist: Dist, cfg: Config, traj: Trajectories, perm: torch.Tensor
) -> dict[str, Any]:
    """Frozen old log-probs, means and stds ``[B, S(, ...)]`` from a no-grad replay at the current
    weights in the first epoch's micro-batches; also the KL to the reference policy."""
    t, g = cfg.train, cfg.sampling.guidance_scale
    b, s = len(traj), len(traj.sde_steps)
    dev = "cpu" if t.trajectories_on_cpu else model.device
    logp = torch.zeros(b, s)
    means = torch.zeros_like(traj.means, device=dev)
    std = torch.zeros(b, s)
    kl_ref = torch.zeros(b, s)
    model.module.eval()
    for mb in perm.split(t.minibatch_size):
        for micro in dist.split(mb).split(t.micro_batch_size):
            for j in range(s):
                out = replay_step(model, kernel, traj, micro, j, g)
                logp[micro, j] = out.log_prob.cpu()
                means[micro, j] = out.mean.to(dev)
                std[micro, j] = out.std.cpu()
                if t.log_ref_kl:
                    with model.disable_adapter():
                        ref = replay_step(model, kernel, traj, micro, j, g)
                    kl_ref[micro, j] = kernel.kl(out.mean, ref.mean, out.std).cpu()
    # each process filled its shares (zeros elsewhere): the sum is the whole batch's anchor
    for x in (logp, means, std) + ((kl_ref,) if t.log_ref_kl else ()):
        dist.all_reduce_sum_(x)
    diff = (logp - traj.log_probs.cpu()).abs()
    tol = cfg.sampling.replay_tolerance
    if float(diff.max()) > tol:
        log.warning(
            "replay log-prob differs from the rollout's by up to %.3g (> replay_tolerance %.3g): "
            "rollout and training forward passes disagree",
            float(diff.max()),
            tol,
        )
    m = {"replay/logp_abs_diff_max": float(diff.max())}
    if t.log_ref_kl:
        m["kl_ref"] = float(kl_ref.mean())
        for j, k in enumerate(traj.sde_steps):
            m[f"kl_ref/step{k}"] = float(kl_ref[:, j].mean())
    return {"logp": logp, "means": means, "std": std, "metrics": m}


def minibatch_step(
    model: FlowModel,
    kernel: Kernel,
    dist: Dist,
    cfg: Config,
    spec: LossSpec,
    optimizer,
    params,
    traj: Trajectories,
    mb: torch.Tensor,
    adv: torch.Tensor,
    anchor: dict,
) -> dict[str, float]:
    """One optimizer step on samples ``mb``; returns the loss metrics of the whole mini-batch."""
    t, g = cfg.train, cfg.sampling.guidance_scale
    s = len(traj.sde_steps)
    n_entries = len(mb) * s  # the whole mini-batch's, over all processes: the step does not depend on their number
    dist.zero_grad(optimizer)
    rec: dict[str, list[torch.Tensor]] = {"logp_new": [], "kl": [], "kl_ref": [], "mean_new": [], "idx": []}
    dev = model.device
    for micro in dist.split(mb).split(t.micro_batch_size):
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("logp_new", "kl", "kl_ref", "mean_new")}
        for j in range(s):
            out = replay_step(model, kernel, traj, micro, j, g)
            mean_old = anchor["means"][micro, j].to(dev)
            std = anchor["std"][micro, j].to(dev)
            kl = kernel.kl(out.mean.detach(), mean_old, std)
            kl_ref = None
            if spec.needs_reference:
                with torch.no_grad(), model.disable_adapter():
                    ref = replay_step(model, kernel, traj, micro, j, g)
                kl_ref = kernel.kl(out.mean, ref.mean, std)[:, None]
            step_sigma = traj.sigmas[traj.sde_steps[j]] - traj.sigmas[traj.sde_steps[j] + 1]
            inp = LossInputs(
                logp_new=out.log_prob[:, None],
                logp_old=anchor["logp"][micro, j][:, None].to(dev),
                adv=adv[micro].to(dev),
                kl=kl[:, None],
                mean_new=out.mean[:, None] if spec.needs_means else None,
                mean_old=mean_old[:, None] if spec.needs_means else None,
                std=std[:, None],
                dt=step_sigma.to(dev).expand(len(micro), 1).float(),
                kl_ref=kl_ref,
            )
            loss, _ = policy_loss(inp, spec)
            dist.backward(reduce_loss(loss, n_entries))
            cols["logp_new"].append(out.log_prob.detach().cpu())
            cols["kl"].append(kl.detach().cpu())
            if kl_ref is not None:
                cols["kl_ref"].append(kl_ref[:, 0].detach().cpu())
            if spec.needs_means:
                cols["mean_new"].append(out.mean.detach().cpu())
        for k, v in cols.items():
            if v:
                rec[k].append(torch.stack(v, 1))
        rec["idx"].append(micro)
    grad_norm = dist.step(optimizer, params, t.grad_clip)  # gradients summed over processes
    # metrics of the whole mini-batch (every process's entries) from the same pure loss function
    idx = dist.all_gather_cat(torch.cat(rec["idx"]))
    cat = {k: dist.all_gather_cat(torch.cat(v, 0)) for k, v in rec.items() if v and k != "idx"}
    inp = LossInputs(
        logp_new=cat["logp_new"],
        logp_old=anchor["logp"][idx],
        adv=adv[idx],
        kl=cat["kl"],
        mean_new=cat.get("mean_new"),
        mean_old=anchor["means"][idx].cpu() if "mean_new" in cat else None,
        std=anchor["std"][idx],
        dt=torch.stack([traj.sigmas[k] - traj.sigmas[k + 1] for k in traj.sde_steps]).float().expand(len(idx), s),
        kl_ref=cat.get("kl_ref"),
    )
    with torch.no_grad():
        _, m = policy_loss(inp, spec)
    m["grad_norm"] = float(grad_norm)
    return m

"""The policy update: the frozen anchor (step 3 of an iteration) and one mini-batch step (step 4).

Both replay the stored SDE steps through :func:`flowdppo.training.rollout.replay_step`, the kernel
call that sampled them, so sampling and training share every formula. :func:`anchor` runs without
gradients in the micro-batches of the first epoch, so the first mini-batch starts at ratio 1 and KL 0.
:func:`minibatch_step` back-propagates each step's loss (summed entries / the whole mini-batch's
entry count, so the update is the same on 1 or N processes) as soon as it is computed, steps the
optimizer once, and returns the metrics of the whole mini-batch from the same pure loss function
(with one gather and one transfer). The losses read the log-ratio formed from the two means.
See docs/flow-dppo.md, sections "Losses" and "One iteration".
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch

from flowdppo.config import Config
from flowdppo.core.losses import LossInputs, LossSpec, metrics_to_floats, policy_loss, reduce_loss
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
    """One optimizer step on samples ``mb``; returns the loss metrics of the whole mini-batch.

    The losses read the log-ratio formed from the two means (:meth:`Kernel.log_ratio`). Nothing inside
    the step waits for the device: the per-entry values stay where they were computed, and after the
    optimizer step one all-gather collects every process's ``[b, S]`` columns, the metrics are computed
    from them by the same pure loss function, and one transfer brings them to the host.
    """
    t, g = cfg.train, cfg.sampling.guidance_scale
    s = len(traj.sde_steps)
    n_entries = len(mb) * s  # the whole mini-batch's, over all processes: the step does not depend on their number
    dist.zero_grad(optimizer)
    cols = ("logp_new", "kl", "log_ratio") + (("kl_ref",) if spec.needs_reference else ())
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in (*cols, "mean_new")}
    dev = model.device
    for micro in dist.split(mb).split(t.micro_batch_size):
        per_step: dict[str, list[torch.Tensor]] = {k: [] for k in rec}
        for j in range(s):
            out = replay_step(model, kernel, traj, micro, j, g)
            mean_old = anchor["means"][micro, j].to(dev)
            std = anchor["std"][micro, j].to(dev)
            kl = kernel.kl(out.mean.detach(), mean_old, std)
            log_ratio = kernel.log_ratio(traj.next_latents[micro, j].to(dev), out.mean, mean_old, std)
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
                exact_log_ratio=log_ratio[:, None],
            )
            loss, _ = policy_loss(inp, spec, tensor_metrics=True)  # metrics come once, after the step
            dist.backward(reduce_loss(loss, n_entries))
            per_step["logp_new"].append(out.log_prob.detach())
            per_step["kl"].append(kl.detach())
            per_step["log_ratio"].append(log_ratio.detach())
            if kl_ref is not None:
                per_step["kl_ref"].append(kl_ref[:, 0].detach())
            if spec.needs_means:
                per_step["mean_new"].append(out.mean.detach())
        for k, v in per_step.items():
            if v:
                rec[k].append(torch.stack(v, 1))
    grad_norm = dist.step(optimizer, params, t.grad_clip)  # gradients summed over processes
    # metrics of the whole mini-batch: one all-gather of this process's [b, S, k] columns (its share of
    # mb, contiguous, so the rank-ordered gather lists the samples of mb in order), one transfer
    local = torch.stack([torch.cat(rec[k], 0).float() for k in cols], -1)
    whole = dist.all_gather_cat(local).cpu()
    cat = {k: whole[..., i] for i, k in enumerate(cols)}
    mean_new = dist.all_gather_cat(torch.cat(rec["mean_new"], 0)).cpu() if spec.needs_means else None
    inp = LossInputs(
        logp_new=cat["logp_new"],
        logp_old=anchor["logp"][mb],
        adv=adv[mb],
        kl=cat["kl"],
        mean_new=mean_new,
        mean_old=anchor["means"][mb].cpu() if spec.needs_means else None,
        std=anchor["std"][mb],
        dt=torch.stack([traj.sigmas[k] - traj.sigmas[k + 1] for k in traj.sde_steps]).float().expand(len(mb), s),
        kl_ref=cat.get("kl_ref"),
        exact_log_ratio=cat["log_ratio"],
    )
    with torch.no_grad():
        _, m = policy_loss(inp, spec, tensor_metrics=True)
    m["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32)
    return metrics_to_floats(m)

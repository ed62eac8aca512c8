"""The policy update: the frozen anchor (step 3 of an iteration) and one mini-batch step (step 4).

Both replay the stored SDE steps through :func:`flowdppo.training.rollout.replay_step`, the kernel
call that sampled them, so sampling and training share every formula. :func:`anchor` either reuses
the rollout's own log-probs and means (``train.anchor``: free, and exact when the rollout and training
forwards are the same computation, which a few replayed samples check every iteration) or replays
without gradients in the micro-batches of the first epoch; either way the first mini-batch starts at
ratio 1 and KL 0. :func:`reference_kl` measures the KL to the reference policy on a subsample (a
diagnostic at beta = 0; at beta > 0 training computes it anyway). :func:`minibatch_step`
back-propagates each step's loss (summed entries / the whole mini-batch's entry count, so the update
is the same on 1 or N processes) as soon as it is computed, steps the optimizer once, and returns the
metrics of the whole mini-batch from the same pure loss function, with one gather and one transfer.
See docs/flow-dppo.md, sections "Losses" and "One iteration".
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch

from flowdppo.config import Config, one_step_per_iteration
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


def reuse_anchor(cfg: Config, model: FlowModel) -> bool:
    """Whether iteration anchors reuse the rollout's log-probs and means (``train.anchor``).

    ``auto`` reuses them for fp32 models (the rollout and the training forwards are then the same
    computation, up to batch-geometry effects that the per-iteration spot check catches) and replays for
    half precision, whose rounding depends on the batch; ``rollout`` always reuses, ``replay`` never.
    """
    mode = cfg.train.anchor
    if mode == "auto":
        tf32 = str(model.device).startswith("cuda") and torch.backends.cuda.matmul.allow_tf32
        return getattr(model, "dtype", torch.float32) == torch.float32 and cfg.model.dtype == "float32" and not tf32
    return mode == "rollout"


def keep_rollout_graph(cfg: Config, model: FlowModel, dist: Dist, reuse: bool) -> bool:
    """Whether the rollout keeps its trained steps' graphs for training to back-propagate through
    (``train.rollout_graph``) instead of recomputing those forwards.

    Exact only when the iteration's single optimizer step runs at the rollout's weights, on the same
    forward: one epoch, one mini-batch of the whole batch, one process, a reused anchor (``reuse``: fp32,
    where the rollout's and training's forwards are the same computation) and no active dropout (the
    rollout runs in eval mode, training in train mode). ``keep`` then keeps them, ``auto`` only on the CPU
    (the graphs of every trained step of the whole batch are held at once), ``recompute`` never.
    """
    t = cfg.train
    if t.rollout_graph == "recompute" or (t.rollout_graph == "auto" and torch.device(model.device).type != "cpu"):
        return False
    dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.module.modules())
    return one_step_per_iteration(t) and not dist.active and reuse and not dropout


def minibatch_permutation(n: int, minibatch_size: int, generator: torch.Generator) -> torch.Tensor:
    """An epoch's order of the ``n`` samples: ``n / minibatch_size`` mini-batches, concatenated.

    The batch is cut into ``minibatch_size`` runs of ``k = n / minibatch_size`` consecutive samples, and each
    mini-batch takes one sample of every run (an independent random assignment per run), listed in run
    order. So each mini-batch holds the same share of every contiguous part of the batch: with ``N``
    processes (``minibatch_size`` a multiple of ``N``), the ``j``-th ``1/N`` of each mini-batch is exactly
    among the samples process ``j`` rolled out (:meth:`Trajectories.rows`), and no sample moves between
    processes. The order does not depend on ``N``, so an update is the same on 1 or N processes. Groups
    are spread evenly over the mini-batches (consecutive samples of a group go to different ones).
    """
    if n % minibatch_size:
        return torch.randperm(n, generator=generator)  # validated away for training; kept for direct calls
    k = n // minibatch_size
    pick = torch.stack([torch.randperm(k, generator=generator) for _ in range(minibatch_size)])  # [m, k]
    runs = torch.arange(minibatch_size)[:, None] * k
    return (runs + pick).T.reshape(-1)


@torch.no_grad()
def replay_anchor(
    model: FlowModel, kernel: Kernel, dist: Dist, cfg: Config, traj: Trajectories, perm: torch.Tensor
) -> dict[str, Any]:
    """Frozen old log-probs and stds ``[B, S]`` (the whole batch) and means ``[b, S, ...]`` (this process's
    samples, rows as in ``traj``) from a no-grad replay at the current weights in the first epoch's
    micro-batches (so the first mini-batch starts at ratio 1 and KL 0)."""
    t, g = cfg.train, cfg.sampling.guidance_scale
    b, s = len(traj), len(traj.sde_steps)
    dev = "cpu" if t.trajectories_on_cpu else model.device
    logp = torch.zeros(b, s)
    means = torch.zeros_like(traj.means, device=dev)
    std = torch.zeros(b, s)
    model.module.eval()
    for mb in perm.split(t.minibatch_size):
        for micro in dist.split(mb).split(t.micro_batch_size):
            for j in range(s):
                out = replay_step(model, kernel, traj, micro, j, g)
                logp[micro, j] = out.log_prob.cpu()
                means[traj.rows(micro), j] = out.mean.to(dev)
                std[micro, j] = out.std.cpu()
    # each process filled its samples' scalars (zeros elsewhere): the sum is the whole batch's; the means
    # stay with the process that holds the samples
    for x in (logp, std):
        dist.all_reduce_sum_(x)
    diff = float((logp - global_log_probs(dist, traj)).abs().max())  # whole-batch tensors: the same everywhere
    tol = cfg.sampling.replay_tolerance
    if diff > tol:
        log.warning(
            "replay log-prob differs from the rollout's by up to %.3g (> replay_tolerance %.3g): "
            "rollout and training forward passes disagree",
            diff,
            tol,
        )
    return {
        "logp": logp,
        "means": means,
        "std": std,
        "metrics": {"replay/logp_abs_diff_max": diff, "anchor/reused": 0.0},
    }


def global_log_probs(dist: Dist, traj: Trajectories) -> torch.Tensor:
    """The rollout log-probs of the whole batch ``[B, S]`` (every process's share, gathered: scalars only)."""
    return dist.all_gather_cat(traj.log_probs.cpu())


def rollout_anchor(kernel: Kernel, dist: Dist, traj: Trajectories) -> dict[str, Any]:
    """The anchor taken from the rollout itself: its log-probs (the whole batch's) and means (this
    process's samples; no forward), the kernel's std."""
    b = len(traj)
    std = torch.stack(
        [kernel.std(traj.sigmas[k], traj.sigmas[k + 1], batch=b, device="cpu") for k in traj.sde_steps], 1
    )
    logp = global_log_probs(dist, traj)
    return {"logp": logp, "means": traj.means, "std": std, "metrics": {"anchor/reused": 1.0}}


@torch.no_grad()
def check_anchor(
    model: FlowModel, kernel: Kernel, dist: Dist, cfg: Config, traj: Trajectories, perm: torch.Tensor
) -> tuple[float, float]:
    """Replay the first ``train.anchor_check_samples`` samples of this process's share of the first
    mini-batch at the first trained step; the largest absolute differences from the rollout's log-probs
    and means."""
    idx = dist.split(perm[: cfg.train.minibatch_size])[: cfg.train.anchor_check_samples]
    r = traj.rows(idx)
    model.module.eval()
    out = replay_step(model, kernel, traj, idx, 0, cfg.sampling.guidance_scale)
    d_logp = (out.log_prob.cpu() - traj.log_probs[r, 0].cpu()).abs().max()
    d_mean = (out.mean - traj.means[r, 0].to(out.mean.device)).abs().max().cpu()
    return float(d_logp), float(d_mean)


def anchor(
    model: FlowModel,
    kernel: Kernel,
    dist: Dist,
    cfg: Config,
    traj: Trajectories,
    perm: torch.Tensor,
    reuse: bool = False,
) -> dict[str, Any]:
    """Step 3: the frozen old policy, ``{"logp" [B, S], "means" [B, S, ...], "std" [B, S], "metrics"}``.

    ``reuse`` (:func:`reuse_anchor`) takes the rollout's own values, checked on a few samples each
    iteration; with ``train.anchor=auto`` a check that disagrees by more than ``sampling.replay_tolerance``
    replays this iteration and returns ``metrics["anchor/fallback"] = 1`` (the trainer then stops
    reusing); with ``train.anchor=rollout`` it only warns. Otherwise a no-grad replay (:func:`replay_anchor`).
    """
    if not reuse:
        return replay_anchor(model, kernel, dist, cfg, traj, perm)
    out = rollout_anchor(kernel, dist, traj)
    if cfg.train.anchor_check_samples > 0:
        # every process must take the same branch (a replay exchanges data): rank 0's measurement decides
        d_logp, d_mean = dist.from_main(check_anchor(model, kernel, dist, cfg, traj, perm))
        out["metrics"].update({"replay/logp_abs_diff_max": d_logp, "anchor/check_mean_abs_diff_max": d_mean})
        tol = cfg.sampling.replay_tolerance
        if d_logp > tol:
            if cfg.train.anchor == "auto":
                log.warning(
                    "train.anchor=auto: the rollout's log-probs differ from a replay by up to %.3g "
                    "(> sampling.replay_tolerance %.3g): replaying the anchor from now on",
                    d_logp,
                    tol,
                )
                out = replay_anchor(model, kernel, dist, cfg, traj, perm)
                out["metrics"]["anchor/fallback"] = 1.0
            else:
                log.warning(
                    "train.anchor=rollout: the reused anchor differs from a replay by up to %.3g in log-prob "
                    "(> sampling.replay_tolerance %.3g); train.anchor=replay recomputes it",
                    d_logp,
                    tol,
                )
    return out


@torch.no_grad()
def reference_kl(
    model: FlowModel, kernel: Kernel, dist: Dist, cfg: Config, traj: Trajectories, idx: torch.Tensor, anchor: dict
) -> dict[str, float]:
    """KL of the anchor policy to the reference policy on samples ``idx`` (a diagnostic at beta = 0):
    ``kl_ref`` and ``kl_ref/step<k>``. Each process measures the samples of ``idx`` it holds (pick ``idx``
    with :func:`spread_subsample`, which gives every process the same number)."""
    t, g = cfg.train, cfg.sampling.guidance_scale
    s = len(traj.sde_steps)
    kl = torch.zeros(len(idx), s)
    model.module.eval()
    for pos in torch.nonzero(traj.owns(idx)).flatten().split(t.micro_batch_size):
        ids = idx[pos]
        for j in range(s):
            with model.disable_adapter():
                ref = replay_step(model, kernel, traj, ids, j, g)
            mean = anchor["means"][traj.rows(ids), j].to(ref.mean.device)
            kl[pos, j] = kernel.kl(mean, ref.mean, anchor["std"][ids, j].to(ref.mean.device)).cpu()
    dist.all_reduce_sum_(kl)
    m = {"kl_ref": float(kl.mean())}
    for j, k in enumerate(traj.sde_steps):
        m[f"kl_ref/step{k}"] = float(kl[:, j].mean())
    return m


def spread_subsample(perm: torch.Tensor, minibatch_size: int, n: int, parts: int = 1) -> torch.Tensor:
    """At least ``n`` samples of an epoch order (:func:`minibatch_permutation`), spread so that each of
    ``parts`` contiguous shares of the batch (one per process) holds the same number: whole mini-batches,
    then every ``k``-th sample of the next one (``k`` the largest power of two dividing
    ``minibatch_size / parts`` that still leaves ``n``). All when ``n`` is 0 or at least the batch."""
    if n <= 0 or n >= len(perm):
        return perm
    full, rest = divmod(n, minibatch_size)
    out = [perm[: full * minibatch_size]]
    if rest:
        k, share = 1, minibatch_size // parts
        while share % (2 * k) == 0 and minibatch_size // (2 * k) >= rest:
            k *= 2
        out.append(perm[full * minibatch_size : (full + 1) * minibatch_size][::k])
    return torch.cat(out)


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
    velocities: list[torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """One optimizer step on samples ``mb``; returns the loss metrics of the whole mini-batch.

    ``velocities`` (:attr:`Trajectories.velocities`, valid only while the weights are the rollout's, and
    only when ``mb`` holds every sample this process rolled out) replaces each step's forward by the
    rollout's own, back-propagated once per step over the whole share; the list is consumed (each entry is
    dropped once its backward has freed its graph).

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
    # non-finite loss entries, counted on the device (no wait); Dist.step reads the count before stepping
    nonfinite = torch.zeros((), device=dev)
    losses: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    if velocities is not None and len(dist.split(mb)) != traj.local_size:
        raise ValueError("rollout velocities need a mini-batch of every sample this process rolled out")
    micros = [dist.split(mb)] if velocities is not None else dist.split(mb).split(t.micro_batch_size)
    for micro in micros:
        per_step: dict[str, list[torch.Tensor]] = {k: [] for k in rec}
        rows = traj.rows(micro)
        for j in range(s):
            v = None
            if velocities is not None:
                v, velocities[j] = velocities[j][rows], None
            out = replay_step(model, kernel, traj, micro, j, g, velocity=v)
            mean_old = anchor["means"][rows, j].to(dev)
            std = anchor["std"][micro, j].to(dev)
            kl = kernel.kl(out.mean.detach(), mean_old, std)
            log_ratio = kernel.log_ratio(traj.next_latents[rows, j].to(dev), out.mean, mean_old, std)
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
            nonfinite = nonfinite + (~torch.isfinite(loss.detach())).sum()
            losses.append((micro, traj.sde_steps[j], loss.detach()))
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
    # gradients summed over processes; a non-finite loss or gradient norm raises before the step
    grad_norm = dist.step(optimizer, params, t.grad_clip)
    # guards, read with the metrics (one transfer): the trainer rolls a failed iteration back to its start
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    weights_bad = torch.stack([(~torch.isfinite(x)).any() for x in local]).any().float().to(nonfinite.device)
    health = torch.stack([nonfinite.float(), weights_bad]).reshape(2)
    if dist.active:
        health = dist.all_reduce_sum_(health.cpu())
    # metrics of the whole mini-batch: one all-gather of this process's [b, S, k] columns (its share of
    # mb, contiguous, so the rank-ordered gather lists the samples of mb in order), one transfer
    local = torch.stack([torch.cat(rec[k], 0).float() for k in cols], -1)
    whole = dist.all_gather_cat(local).cpu()
    cat = {k: whole[..., i] for i, k in enumerate(cols)}
    # (a trust region that reads the means, GRPO-Guard, has them gathered for its metrics)
    mean_new = mean_old = None
    if spec.needs_means:
        mean_new = dist.all_gather_cat(torch.cat(rec["mean_new"], 0)).cpu()
        mean_old = dist.all_gather_cat(anchor["means"][traj.rows(dist.split(mb))].to(dev)).cpu()
    inp = LossInputs(
        logp_new=cat["logp_new"],
        logp_old=anchor["logp"][mb],
        adv=adv[mb],
        kl=cat["kl"],
        mean_new=mean_new,
        mean_old=mean_old,
        std=anchor["std"][mb],
        dt=torch.stack([traj.sigmas[k] - traj.sigmas[k + 1] for k in traj.sde_steps]).float().expand(len(mb), s),
        kl_ref=cat.get("kl_ref"),
        exact_log_ratio=cat["log_ratio"],
    )
    with torch.no_grad():
        _, m = policy_loss(inp, spec, tensor_metrics=True)
    m["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32)
    m["_guard/loss"], m["_guard/weights"] = health[0], health[1]
    out = metrics_to_floats(m)
    bad_loss, bad_weights = out.pop("_guard/loss"), out.pop("_guard/weights")
    from flowdppo.errors import NonFiniteError

    if bad_loss > 0:
        raise NonFiniteError(f"non-finite loss {_first_bad(losses)}; the optimizer step is rolled back")
    if not math.isfinite(out["grad_norm"]):
        raise NonFiniteError(f"non-finite gradient norm ({out['grad_norm']}); the optimizer step is rolled back")
    if bad_weights > 0:
        raise NonFiniteError("the optimizer step made a weight non-finite (is train.lr too large?)")
    return out


def _first_bad(losses: list[tuple[torch.Tensor, int, torch.Tensor]]) -> str:
    """``value for sample i at SDE step k``: the first non-finite loss entry (read only after a failure)."""
    for micro, step, loss in losses:
        bad = (~torch.isfinite(loss)).flatten(1).any(1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            return f"{float(loss.flatten(1)[row].sum())} for sample {int(micro[row])} at SDE step {step}"
    return "on another process"

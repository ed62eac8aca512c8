"""Sampling with a kernel while recording what training needs, and replaying the stored steps.

:func:`rollout` runs the whole schedule: SDE steps (``sde_steps``) through the kernel, every other
step as an Euler ODE step, and stores only the latent before and after each SDE step, its log-prob and
mean, and the final sample (docs/flow-dppo.md, section "Step selection"). :func:`replay_step` scores
one stored step under the current weights through the very same kernel call (``prev_sample``
given), so that sampling and training can never disagree on the maths.

Shapes: ``B`` samples, ``S`` SDE steps, latents ``[C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flowdppo.core.sde import Kernel, StepOutput, sigma_batch, uniform_shift_sigmas
from flowdppo.models.base import Cond, FlowModel


@dataclass
class Trajectories:
    """A rollout batch of ``B`` samples, of which this process holds ``b`` (all of them in one process).

    ``prompts`` and ``group_ids`` describe the whole batch (global sample indices ``0 .. B-1``); the tensors
    hold only this process's samples ``offset .. offset + b - 1``, the contiguous share it rolled out:
    ``latents``/``next_latents``/``means`` ``[b, S, C, H, W]``, ``log_probs`` ``[b, S]``, ``final``
    ``[b, C, H, W]``, ``cond`` ``[b]``. Index them with :meth:`rows` of global indices.
    """

    prompts: list[str]
    group_ids: torch.Tensor  # [B] prompt index of each sample
    cond: Cond  # [b] conditioning (already one row per sample)
    sigmas: torch.Tensor  # [N + 1]
    sde_steps: list[int]  # the S step indices
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    final: torch.Tensor
    offset: int = 0  # global index of this process's first sample
    # the rollout's velocities of the SDE steps, one [b, C, H, W] per step, still attached to their autograd
    # graphs (``rollout(keep_graph=True)``); training back-propagates through them once, then drops them
    velocities: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        n, b, s = len(self.prompts), self.latents.shape[0], len(self.sde_steps)
        assert self.group_ids.shape == (n,), self.group_ids.shape
        assert 0 <= self.offset and self.offset + b <= n, (self.offset, b, n)
        assert self.latents.shape[:2] == (b, s) and self.next_latents.shape == self.latents.shape
        assert self.means.shape == self.latents.shape and self.log_probs.shape == (b, s)
        assert self.final.shape[0] == b and self.cond.batch_size == b
        if self.velocities is not None:
            step_shape = (b, *self.latents.shape[2:])
            assert len(self.velocities) == s and all(v.shape == step_shape for v in self.velocities)

    def __len__(self) -> int:
        """``B``, the whole batch's size (:attr:`local_size` is this process's)."""
        return len(self.prompts)

    @property
    def local_size(self) -> int:
        return self.latents.shape[0]

    @property
    def local_indices(self) -> torch.Tensor:
        """The global indices of the samples this process holds."""
        return torch.arange(self.offset, self.offset + self.local_size)

    def owns(self, idx: torch.Tensor) -> torch.Tensor:
        """Mask of the global indices ``idx`` that this process holds."""
        return (idx >= self.offset) & (idx < self.offset + self.local_size)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the stored tensors for global sample indices ``idx`` (all held by this process)."""
        if len(idx) and not bool(self.owns(idx).all()):
            raise IndexError(
                f"samples {idx.tolist()} are not all held here ({self.offset}..{self.offset + self.local_size - 1})"
            )
        return idx - self.offset


@torch.no_grad()
def sample(
    model: FlowModel,
    kernel: Kernel,
    cond: Cond,
    sigmas: torch.Tensor,
    sde_steps: Sequence[int],
    noise: torch.Tensor,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    step_noise: torch.Tensor | None = None,
    keep_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Run one batch through the schedule. ``noise`` is the initial ``x_1`` ``[B, C, H, W]``.

    ``step_noise`` ``[B, S, C, H, W]`` optionally fixes the SDE noise (else drawn from ``generator``).
    Returns ``latents``, ``next_latents``, ``means`` ``[B, S, C, H, W]``, ``log_probs`` ``[B, S]``,
    ``final`` ``[B, C, H, W]``. ``keep_graph`` computes the SDE steps' velocities with gradients and adds
    them, attached to their graphs, as ``velocities`` (a list of ``S`` ``[B, C, H, W]``); the sample itself
    is computed from detached values (no gradient flows along the trajectory), and the forward is the
    same computation as without gradients.
    """
    b = noise.shape[0]
    device = noise.device
    sde = {k: j for j, k in enumerate(sde_steps)}
    n = len(sigmas) - 1
    if any(k < 0 or k >= n for k in sde):
        raise ValueError(f"SDE step indices {list(sde_steps)} must lie in [0, {n})")
    x = noise.float()
    lat, nxt, means, lps, graphs = [], [], [], [], []
    for k in range(n):
        s = sigma_batch(sigmas[k], b, device)
        sn = sigma_batch(sigmas[k + 1], b, device)
        if k in sde and keep_graph:
            with torch.enable_grad():
                v_graph = model.velocity(x, s, cond, guidance_scale)
            graphs.append(v_graph)
            v = v_graph.detach()
        else:
            v = model.velocity(x, s, cond, guidance_scale)
        if k in sde:
            eps = step_noise[:, sde[k]] if step_noise is not None else None
            out = kernel.step(v, x, s, sn, generator=generator, noise=eps)
            lat.append(x)
            nxt.append(out.x_next)
            means.append(out.mean)
            lps.append(out.log_prob)
        else:
            out = kernel.step(v, x, s, sn, stochastic=False)
        x = out.x_next
    empty = noise.new_zeros((b, 0, *noise.shape[1:]))
    out = {
        "latents": torch.stack(lat, 1) if lat else empty,
        "next_latents": torch.stack(nxt, 1) if nxt else empty,
        "means": torch.stack(means, 1) if means else empty,
        "log_probs": torch.stack(lps, 1) if lps else noise.new_zeros((b, 0)),
        "final": x,
    }
    if keep_graph:
        out["velocities"] = graphs
    return out


def rollout(
    model: FlowModel,
    kernel: Kernel,
    prompts: Sequence[str],
    group_ids: torch.Tensor,
    cond: Cond,
    sigmas: torch.Tensor,
    sde_steps: Sequence[int],
    guidance_scale: float,
    generator: torch.Generator,
    batch_size: int,
    store_device: torch.device | str | None = None,
    part: slice | None = None,
    same_initial_noise: bool = False,
    on_chunk: Callable[[slice, dict[str, torch.Tensor]], None] | None = None,
    keep_graph: bool = False,
) -> Trajectories:
    """Sample ``len(prompts)`` trajectories in chunks of ``batch_size``; initial noise and SDE noise come
    from ``generator`` (CPU) so a run is reproducible whatever the device.

    ``part`` (a slice of the batch) samples only those trajectories and returns them alone: the noise of
    the whole batch is drawn in the same chunk order and sliced, so a sample gets the same noise whichever
    process rolls it out (:mod:`flowdppo.training.distributed`).

    ``same_initial_noise`` gives every sample of a group the initial noise of the group's first sample
    (DanceGRPO's ``init_same_noise``): the group then differs only by the SDE noise of the trained steps,
    so the group-relative advantage credits those steps alone. The random stream drawn is the same.

    ``on_chunk(idx, out)`` is called after each chunk (``idx`` indexes this process's share): the trainer
    hands the chunk's final latents to a background scorer there (:mod:`flowdppo.rewards.overlap`).

    ``keep_graph`` keeps the SDE steps' velocities attached to their autograd graphs
    (:attr:`Trajectories.velocities`, on the model's device whatever ``store_device``), for a training
    step at the rollout's weights to back-propagate through instead of recomputing them.
    """
    b = len(prompts)
    c, h, w = model.latent_shape
    part = slice(0, b) if part is None else part
    noise, step_noise = [], []
    for start in range(0, b, batch_size):
        m = min(batch_size, b - start)
        noise.append(torch.randn((m, c, h, w), generator=generator))
        step_noise.append(torch.randn((m, len(sde_steps), c, h, w), generator=generator))
    noise, step_noise = torch.cat(noise), torch.cat(step_noise)
    if same_initial_noise:
        first: dict[int, int] = {}
        noise = noise[[first.setdefault(int(g), i) for i, g in enumerate(group_ids.tolist())]]
    noise, step_noise = noise[part], step_noise[part]
    cond = cond.index(part)
    n_local = part.stop - part.start
    chunks: list[dict[str, torch.Tensor]] = []
    graphs: list[list[torch.Tensor]] = []
    for start in range(0, n_local, batch_size):
        idx = slice(start, min(start + batch_size, n_local))
        out = sample(
            model,
            kernel,
            cond.index(idx).to(model.device),
            sigmas,
            sde_steps,
            noise[idx].to(model.device),
            guidance_scale,
            step_noise=step_noise[idx].to(model.device),
            keep_graph=keep_graph,
        )
        if keep_graph:
            graphs.append(out.pop("velocities"))
        if store_device is not None:
            out = {k: v.to(store_device) for k, v in out.items()}
        chunks.append(out)
        if on_chunk is not None:
            on_chunk(idx, out)
    cat = {k: torch.cat([ch[k] for ch in chunks], 0) for k in chunks[0]}
    return Trajectories(
        list(prompts),
        group_ids,
        cond,
        sigmas,
        list(sde_steps),
        cat["latents"],
        cat["next_latents"],
        cat["log_probs"],
        cat["means"],
        cat["final"],
        offset=part.start,
        velocities=[torch.cat([g[j] for g in graphs]) for j in range(len(sde_steps))] if keep_graph else None,
    )


def replay_step(
    model: FlowModel,
    kernel: Kernel,
    traj: Trajectories,
    idx: torch.Tensor,
    j: int,
    guidance_scale: float,
    velocity: torch.Tensor | None = None,
) -> StepOutput:
    """Score stored SDE step ``j`` (column of ``traj``) for samples ``idx`` (global indices held by this
    process) under the current weights.

    Runs with whatever grad mode the caller set. Returns the kernel's output: ``mean`` ``[b, C, H, W]``,
    ``std`` and ``log_prob`` ``[b]``. ``velocity`` (``[b, C, H, W]``, the rollout's own, with its graph)
    stands in for the model's forward when the weights are still those of the rollout.
    """
    dev = model.device
    k = traj.sde_steps[j]
    r = traj.rows(idx)
    x = traj.latents[r, j].to(dev)
    b = x.shape[0]
    s = sigma_batch(traj.sigmas[k], b, dev)
    sn = sigma_batch(traj.sigmas[k + 1], b, dev)
    v = model.velocity(x, s, traj.cond.index(r).to(dev), guidance_scale) if velocity is None else velocity
    return kernel.step(v, x, s, sn, prev_sample=traj.next_latents[r, j].to(dev))


@torch.no_grad()
def ode_sample(
    model: FlowModel, cond: Cond, sigmas: torch.Tensor, noise: torch.Tensor, guidance_scale: float = 1.0
) -> torch.Tensor:
    """Deterministic Euler sampling (evaluation): final latents ``[B, C, H, W]``."""
    return sample(model, Kernel(sampler="ode", eta=0.0), cond, sigmas, [], noise, guidance_scale)["final"]


def sampling_schedule(model: FlowModel, s) -> tuple[torch.Tensor, Kernel]:
    """The sigmas ``[N + 1]`` (CPU, fp32) and the kernel of a run's ``sampling`` section (a
    :class:`flowdppo.config.SamplingConfig`): ``uniform-shift`` is the SD3 static shift with
    ``sampling.shift`` whatever the model; otherwise the model's own schedule of that name."""
    if s.schedule == "uniform-shift":
        sigmas = uniform_shift_sigmas(s.num_steps, s.shift)
    else:
        sigmas = model.sigmas(s.num_steps, s.schedule).float().cpu()
    if sigmas.shape != (s.num_steps + 1,):
        raise ValueError(f"model.sigmas returned shape {tuple(sigmas.shape)}, expected ({s.num_steps + 1},)")
    kernel = Kernel.for_schedule(
        sigmas, sampler=s.sampler, eta=s.eta, logprob_reduction=s.logprob_reduction, cps_logprob=s.cps_logprob
    )
    return sigmas, kernel

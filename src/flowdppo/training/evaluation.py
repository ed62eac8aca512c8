"""Evaluation during a run: deterministic ODE samples with fixed noise, scored by the reward; image
grids of the same prompts and seeds before and after training; the live ratio-noise measurement.

- :class:`Evaluator`: every evaluation set (``eval.samples_per_prompt`` fixed-noise samples of each
  prompt, noise from ``eval.seed``) sampled with the Euler ODE and scored by the training reward:
  ``eval/<set>/<component>`` is the mean of each reward component, plus the world's own breakdown
  (:mod:`flowdppo.training.prompts`) as ``eval/<set>/<key>``. With several processes each samples its
  padded share and the scores are gathered, so the result is the one-process result.
- :func:`save_image_grid`: the one PNG grid writer (rows = prompts, columns = seeds).
- :func:`ratio_noise`: docs/flow-dppo.md, section "Ratio noise", measured on the live run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flowdppo.config import Config
from flowdppo.core.analysis import ratio_noise_report
from flowdppo.core.sde import Kernel
from flowdppo.models.base import Cond, FlowModel
from flowdppo.training.distributed import Dist
from flowdppo.training.prompts import Breakdown, PromptSource
from flowdppo.training.rollout import Trajectories, ode_sample, replay_step


def save_image_grid(images: torch.Tensor, prompts: Sequence[str], n_cols: int, path: Path, scale: int = 4) -> None:
    """``images`` ``[R*n_cols, 3, H, W]`` in [0, 1] -> a labelled PNG, one row per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n_rows = len(prompts)
    imgs = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 2.8, 1.3 * n_rows), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(imgs[r * n_cols + c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(prompts[r], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


class Evaluator:
    """Scores a model on named evaluation sets (the trainer's, or any: ``flowdppo pretrain`` uses it too).

    ``encode`` maps prompts to conditioning; ``breakdown`` (optional) adds a world's own metrics;
    ``batch_size`` samples per forward (the noise is drawn in chunks of it, so it is part of the seed).
    """

    def __init__(
        self,
        model: FlowModel,
        sigmas: torch.Tensor,
        encode: Callable[[Sequence[str]], Cond],
        reward_fn: Callable[[Sequence[str], torch.Tensor], dict[str, torch.Tensor]],
        eval_sets: dict[str, list[str]],
        breakdown: Breakdown | None = None,
        *,
        samples_per_prompt: int = 1,
        seed: int = 0,
        guidance_scale: float = 1.0,
        batch_size: int = 128,
        grid_prompts: int = 8,
        dist: Dist | None = None,
    ):
        self.model, self.sigmas, self.encode, self.reward_fn = model, sigmas, encode, reward_fn
        self.eval_sets, self.breakdown, self.dist = eval_sets, breakdown, dist if dist is not None else Dist()
        self.samples_per_prompt, self.seed, self.guidance_scale = samples_per_prompt, seed, guidance_scale
        self.batch_size, self.grid_prompts = batch_size, grid_prompts

    @classmethod
    def for_run(cls, cfg: Config, model, sigmas, encode, reward_fn, source: PromptSource, dist: Dist) -> Evaluator:
        """The evaluator of a training run: ``eval.*`` settings, the rollout batch size, the run's CFG."""
        e = cfg.eval
        return cls(
            model, sigmas, encode, reward_fn, source.eval_sets, source.breakdown,
            samples_per_prompt=e.samples_per_prompt, seed=e.seed, guidance_scale=cfg.sampling.guidance_scale,
            batch_size=cfg.train.rollout_batch_size, grid_prompts=e.grid_prompts, dist=dist,
        )  # fmt: skip

    def _images(self, prompts: Sequence[str], noise: torch.Tensor, bs: int) -> torch.Tensor:
        """Decoded ODE samples ``[b, 3, H, W]`` on the CPU from initial noise ``[b, C, H, W]``, ``bs`` at a time."""
        dev, g = self.model.device, self.guidance_scale
        finals = [
            ode_sample(
                self.model, self.encode(prompts[i : i + bs]).to(dev), self.sigmas, noise[i : i + bs].to(dev), g
            ).cpu()
            for i in range(0, len(prompts), bs)
        ]
        return self.model.decode(torch.cat(finals).to(dev)).float().cpu()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        self.model.module.eval()
        out: dict[str, Any] = {}
        c, h, w = self.model.latent_shape
        bs = self.batch_size
        for name, unique in self.eval_sets.items():
            if not unique:
                continue
            prompts = [p for p in unique for _ in range(self.samples_per_prompt)]
            gen = torch.Generator().manual_seed(self.seed)
            noise = torch.cat(
                [torch.randn((min(bs, len(prompts) - i), c, h, w), generator=gen) for i in range(0, len(prompts), bs)]
            )
            # this process's part of the set, padded so that every process runs the same forwards
            mine, _ = self.dist.padded_share(len(prompts))
            local = [prompts[i] for i in mine.tolist()]
            images = self._images(local, noise[mine], bs)
            scores = {
                k: self.dist.gather_padded(v.float().cpu(), len(prompts))
                for k, v in self.reward_fn(local, images).items()
            }
            out.update({f"eval/{name}/{k}": float(v.mean()) for k, v in scores.items()})
            if self.breakdown is not None:
                out.update({f"eval/{name}/{k}": v for k, v in self.breakdown(prompts, scores).items()})
        return out

    @torch.no_grad()
    def grid(
        self, path: Path, n_prompts: int | None = None, n_seeds: int = 4, prompts: Sequence[str] | None = None
    ) -> Path | None:
        """A PNG grid: rows = ``prompts`` (default: the first evaluation prompts), columns = fixed seeds
        (noise from ``seed + 1``: the same images before and after training)."""
        if prompts is None:
            prompts = next(iter(self.eval_sets.values()), [])[: n_prompts or self.grid_prompts]
        prompts = list(prompts)
        if not prompts:
            return None
        self.model.module.eval()
        c, h, w = self.model.latent_shape
        gen = torch.Generator().manual_seed(self.seed + 1)
        rows = [p for p in prompts for _ in range(n_seeds)]
        noise = torch.randn((len(rows), c, h, w), generator=gen)
        images = self._images(rows, noise, len(rows))
        if not self.dist.is_main:  # every process sampled (FSDP2 needs it); rank 0 writes
            return None
        save_image_grid(images, prompts, n_seeds, path)
        return path


@torch.no_grad()
def ratio_noise(
    model: FlowModel, kernel: Kernel, traj: Trajectories, anchor: dict, n: int, guidance_scale: float
) -> dict[str, float]:
    """Old means (the anchor) against the updated policy on the first ``n`` stored actions this process
    holds (with several processes the trainer logs rank 0's), per SDE step: ``ratio_noise/step<k>/<stat>``
    (measured mean and std of the exact log-ratio, its predicted std ``sqrt(2 KL)``, the median ratio and
    the fractions a PPO clip of 0.2 would cut)."""
    idx = traj.local_indices[:n]
    rows = traj.rows(idx)
    model.module.eval()
    mean_new = torch.stack(
        [replay_step(model, kernel, traj, idx, j, guidance_scale).mean.cpu() for j in range(len(traj.sde_steps))], 1
    )
    stats = ratio_noise_report(
        anchor["means"][rows].cpu(),
        mean_new,
        anchor["std"][idx],
        traj.next_latents[rows].cpu(),
        clip_eps=0.2,
        reduction="sum",
        step_indices=traj.sde_steps,
    )
    keys = ("kl_mean", "log_r_mean", "log_r_std", "log_r_std_pred", "ratio_median", "clip_low_frac", "clip_high_frac")
    return {f"ratio_noise/step{st.step}/{k}": getattr(st, k) for st in stats for k in keys}

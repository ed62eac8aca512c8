"""The RL loop of SPEC section 7, with checkpoint and resume. No maths of its own.

One iteration:
1. pick the SDE steps (seeded by ``(seed, iteration)``) and the prompts; roll out ``G`` samples each;
2. score them and compute advantages;
3. freeze the anchor: a no-grad replay of the SDE steps at the current weights, in the exact
   micro-batches the first training epoch uses (so its first mini-batch has ``r = 1`` and ``D = 0``);
4. ``inner_epochs`` passes over the batch in mini-batches (one optimizer step each, grad-norm clip),
   each step's loss back-propagated as soon as it is computed (memory stays one step deep);
5. log, evaluate every ``eval.every`` iterations, checkpoint every ``log.checkpoint_every``.

Every random draw of an iteration comes from generators seeded by ``(seed, iteration)``, so a run
resumed from a checkpoint reproduces the uninterrupted one.

Under ``torchrun`` / ``accelerate launch`` (``self.dist``, :mod:`flowdppo.training.distributed`) every process
draws the same whole-batch randomness, rolls out its share, and the rewards, trajectories, anchor,
gradients and metrics are exchanged so that the update is the one-process update; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo.config import Config, ConfigError
from flowdppo.core import advantages as adv_lib
from flowdppo.core.analysis import ratio_noise_report
from flowdppo.core.losses import LossInputs, LossSpec, policy_loss
from flowdppo.core.sde import Kernel, uniform_shift_sigmas
from flowdppo.core.steps import StepSelection
from flowdppo.models import FlowModel, build_model
from flowdppo.models.base import Cond
from flowdppo.rewards import build_reward
from flowdppo.training.distributed import Dist, NullLogger, enable_gradient_checkpointing
from flowdppo.training.rollout import Trajectories, ode_sample, replay_step, rollout

log = logging.getLogger("flowdppo")


def _seed_for(seed: int, iteration: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, iteration, purpose)."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(stream)]).generate_state(1)[0])


def _gen(seed: int, iteration: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, iteration, stream))


class RunLogger:
    """``metrics.jsonl`` (one line per iteration, flushed) and optional TensorBoard events."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # pragma: no cover - tensorboard is a dependency
                log.warning("TensorBoard disabled: %s", e)

    def truncate_after(self, iteration: int) -> None:
        """Drop lines of iterations > ``iteration`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["iteration"] <= iteration
        ]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            it = record["iteration"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                    self.tb.add_scalar(k, v, it)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Flow-DPPO and its baselines over any :class:`FlowModel`.

    ``model``, ``reward_fn`` and ``prompts`` default to what the config names (the shipped shapes
    model, the shapes reward and the shapes world's train split).
    """

    def __init__(
        self,
        cfg: Config,
        model: FlowModel | None = None,
        reward_fn: Callable[[Sequence[str], torch.Tensor], dict[str, torch.Tensor]] | None = None,
        prompts: Sequence[str] | None = None,
        run_dir: str | os.PathLike | None = None,
        eval_sets: dict[str, list[str]] | None = None,
        overwrite: bool = False,
        dist: Dist | None = None,
    ):
        self.cfg = cfg
        # several processes (torchrun / accelerate launch): see flowdppo.training.distributed; one process by default
        self.dist = dist if dist is not None else Dist.from_env(cfg.model.device)
        self.dist.check_batch(cfg.train.prompts_per_iter * cfg.train.group_size, cfg.train.minibatch_size)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.log.run_dir) / cfg.log.name
        if self.dist.is_main and self.run_dir.exists() and any(self.run_dir.iterdir()) and overwrite:
            shutil.rmtree(self.run_dir)
        self.dist.barrier()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)
        self.model = (
            model
            if model is not None
            else build_model(dataclasses.replace(cfg.model, device=self.dist.model_device(cfg.model.device)))
        )
        self.reward_fn = reward_fn if reward_fn is not None else build_reward(cfg.reward)
        self.shapes_world = reward_fn is None and cfg.reward.name == "shapes"  # per-category evaluation
        self.train_prompts, self.eval_sets = self._prompt_sources(prompts, eval_sets)
        s = cfg.sampling
        schedule = s.schedule
        if schedule == "uniform-shift":  # the SD3 static shift with the configured shift, whatever the model
            self.sigmas = uniform_shift_sigmas(s.num_steps, s.shift)
        else:
            self.sigmas = self.model.sigmas(s.num_steps, schedule).float().cpu()
        if self.sigmas.shape != (s.num_steps + 1,):
            raise ValueError(f"model.sigmas returned shape {tuple(self.sigmas.shape)}, expected ({s.num_steps + 1},)")
        self.kernel = Kernel.for_schedule(
            self.sigmas, sampler=s.sampler, eta=s.eta, logprob_reduction=s.logprob_reduction, cps_logprob=s.cps_logprob
        )
        a = cfg.algorithm
        self.loss_spec = LossSpec(
            name=a.loss,
            delta=a.delta,
            clip_eps=a.clip_eps,
            loss_adv_clip=a.loss_adv_clip,
            beta=a.beta,
            args=a.loss_args,
        )
        self.step_sel = StepSelection(**asdict(cfg.steps))
        if not any(p.requires_grad for p in self.model.trainable_parameters()):
            raise ValueError("the model has no trainable parameters (enable model.lora or full fine-tuning)")
        t = cfg.train
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        # backward passes per optimizer step on one process (DeepSpeed's accumulation count)
        micro_steps = math.ceil(t.minibatch_size // self.dist.world / t.micro_batch_size) * len(
            self.step_sel.select(s.num_steps, t.seed, 0)
        )
        self.params, self.optimizer = self.dist.prepare(
            self.model,
            t.sharding,
            lambda ps: torch.optim.AdamW(
                ps, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
            ),
            micro_steps=micro_steps,
            grad_clip=t.grad_clip,
        )
        self.tracker = adv_lib.PerPromptStatTracker(global_std=a.advantage_std == "global") if a.stat_tracker else None
        self.iteration = 0  # completed iterations
        self.logger = RunLogger(self.run_dir, cfg.log.tensorboard) if self.dist.is_main else NullLogger()
        self.history: list[dict[str, Any]] = []
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self._prompt_cache: dict[str, Cond] = {}

    # ------------------------------------------------------------------ prompts

    def _prompt_sources(self, prompts, eval_sets):
        cfg = self.cfg
        if prompts is None and cfg.train.prompts_file:
            prompts = _read_lines(cfg.train.prompts_file)
        if eval_sets is None and cfg.eval.prompts_file:
            eval_sets = {"eval": _read_lines(cfg.eval.prompts_file)}
        if eval_sets is None and prompts is not None and cfg.model.family != "shapes":
            eval_sets = {}  # a real model with its own prompts: no shapes-world evaluation by default
        if prompts is None or eval_sets is None:
            if cfg.model.family != "shapes" and prompts is None:
                raise ConfigError("train.prompts_file is required for models other than the embedded shapes model")
            from flowdppo.worlds import shapes

            sets = shapes.prompt_sets(seed=0)
            if cfg.train.prompt_split not in sets:
                raise ConfigError(
                    f"train.prompt_split {cfg.train.prompt_split!r} is not valid; valid: {', '.join(sets)}"
                )
            if prompts is None:
                prompts = [p.text for p in sets[cfg.train.prompt_split]]
            if eval_sets is None:
                unknown = [n for n in cfg.eval.sets if n not in sets]
                if unknown:
                    raise ConfigError(f"eval.sets: {unknown[0]!r} is not valid; valid: {', '.join(sets)}")
                eval_sets = {n: [p.text for p in sets[n]][: cfg.eval.num_prompts] for n in cfg.eval.sets}
        if not prompts:
            raise ConfigError("no training prompts")
        return list(prompts), {k: list(v)[: cfg.eval.num_prompts] for k, v in eval_sets.items()}

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Conditioning for ``prompts`` (each unique prompt encoded once and cached)."""
        g = self.cfg.sampling.guidance_scale
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                enc = self.model.encode_prompts(missing, g).to("cpu")
            for i, p in enumerate(missing):
                self._prompt_cache[p] = enc.index([i])
        return Cond.cat([self._prompt_cache[p] for p in prompts])

    # ------------------------------------------------------------------ one iteration

    def collect(
        self, it: int, prompt_iteration: int | None = None
    ) -> tuple[Trajectories, torch.Tensor, dict[str, float], dict[str, float]]:
        """Steps 1-2 of iteration ``it``: roll out (every draw seeded by ``(seed, it)``), score, and compute
        advantages. ``prompt_iteration`` draws the prompts of another iteration (same prompts, new noise).
        Returns ``(trajectories, advantages [B], reward metrics, timing)``."""
        cfg, t = self.cfg, self.cfg.train
        timing: dict[str, float] = {}
        tic = time.perf_counter()
        sde_steps = self.step_sel.select(cfg.sampling.num_steps, t.seed, it)
        rng = np.random.default_rng(_seed_for(t.seed, it if prompt_iteration is None else prompt_iteration, 0))
        chosen = [
            self.train_prompts[i]
            for i in rng.choice(
                len(self.train_prompts), t.prompts_per_iter, replace=len(self.train_prompts) < t.prompts_per_iter
            )
        ]
        prompts = [p for p in chosen for _ in range(t.group_size)]
        group_ids = torch.arange(len(chosen)).repeat_interleave(t.group_size)
        cond = self.encode(chosen).repeat_interleave(t.group_size)

        # 1. rollout: this process's contiguous share of the batch (all of it in one process)
        self.model.module.eval()
        store = "cpu" if t.trajectories_on_cpu else None
        part = self.dist.share(len(prompts))
        traj = rollout(
            self.model,
            self.kernel,
            prompts,
            group_ids,
            cond,
            self.sigmas,
            sde_steps,
            cfg.sampling.guidance_scale,
            _gen(t.seed, it, 1),
            t.rollout_batch_size,
            store_device=store,
            part=part,
            same_initial_noise=cfg.sampling.same_initial_noise,
        )
        with torch.no_grad():
            images = self.model.decode(traj.final.to(self.model.device)).float().cpu()
        traj = self.dist.gather_trajectories(traj, prompts, group_ids, cond)
        timing["time/rollout"] = time.perf_counter() - tic

        # 2. rewards (gathered: advantages see the whole batch, identically on every process)
        tic = time.perf_counter()
        rewards = {
            k: self.dist.all_gather_cat(v.float().cpu()) for k, v in self.reward_fn(prompts[part], images).items()
        }
        adv, reward_metrics = self.advantages(prompts, group_ids, rewards)
        timing["time/reward"] = time.perf_counter() - tic
        return traj, adv, reward_metrics, timing

    def iteration_step(self, it: int) -> dict[str, Any]:
        """Run iteration ``it`` (0-based) and return its metrics."""
        cfg, t = self.cfg, self.cfg.train
        traj, adv, reward_metrics, timing = self.collect(it)
        sde_steps = traj.sde_steps

        # 3. anchor, in the micro-batches of the first epoch
        tic = time.perf_counter()
        perms = [torch.randperm(len(traj), generator=_gen(t.seed, it, 2 + e)) for e in range(t.inner_epochs)]
        anchor = self.anchor(traj, perms[0])
        timing["time/anchor"] = time.perf_counter() - tic

        # 4. inner epochs
        tic = time.perf_counter()
        self.model.module.train()
        mb_metrics = []
        for perm in perms:
            for mb in perm.split(t.minibatch_size):
                mb_metrics.append(self.train_minibatch(traj, mb, adv, anchor))
        timing["time/train"] = time.perf_counter() - tic

        metrics: dict[str, Any] = {"iteration": it, "sde_steps": sde_steps}
        metrics.update(reward_metrics)
        metrics.update(_mean_metrics(mb_metrics))
        metrics.update(
            {f"first_mb/{k}": mb_metrics[0][k] for k in ("ratio_min", "ratio_max", "kl_max") if k in mb_metrics[0]}
        )
        metrics["num_optimizer_steps"] = len(mb_metrics)
        metrics.update(anchor["metrics"])
        if cfg.eval.ratio_noise_every and it % cfg.eval.ratio_noise_every == 0:
            tic = time.perf_counter()
            metrics.update(self.ratio_noise(traj, anchor))
            timing["time/ratio_noise"] = time.perf_counter() - tic
        metrics.update(timing)
        return metrics

    def advantages(self, prompts, group_ids, rewards: dict[str, torch.Tensor]):
        a = self.cfg.algorithm
        weights = self.cfg.reward.weights
        missing = [k for k in weights if k not in rewards]
        if missing:
            raise ConfigError(
                f"reward.weights names {missing[0]!r}, which the reward does not return; valid: {', '.join(rewards)}"
            )
        names = list(weights)
        stacked = torch.stack([rewards[k] for k in names], 1)
        total = adv_lib.combine_rewards(stacked, [weights[k] for k in names])
        if a.multi_reward == "gdpo" and len(names) > 1:
            adv = adv_lib.gdpo_advantages(stacked, group_ids, [weights[k] for k in names], clip=a.norm_adv_clip)
        elif self.tracker is not None:
            adv = self.tracker.update(prompts, total)
            if a.norm_adv_clip is not None:
                adv = adv.clamp(-a.norm_adv_clip, a.norm_adv_clip)
        else:
            adv = adv_lib.group_advantages(total, group_ids, std=a.advantage_std, clip=a.norm_adv_clip)
        m = {f"reward/{k}": float(v.mean()) for k, v in rewards.items()}
        m["reward/total"] = float(total.mean())
        m["reward/zero_std_group_frac"] = adv_lib.zero_std_group_fraction(total, group_ids)
        m.update(
            {
                "adv/mean": float(adv.mean()),
                "adv/std": float(adv.std()),
                "adv/min": float(adv.min()),
                "adv/max": float(adv.max()),
                "adv/abs_mean": float(adv.abs().mean()),
            }
        )
        return adv.float(), m

    @torch.no_grad()
    def anchor(self, traj: Trajectories, perm: torch.Tensor) -> dict[str, Any]:
        """Frozen old log-probs, means and stds ``[B, S(, ...)]`` from a no-grad replay at the current
        weights in the first epoch's micro-batches; also the KL to the reference policy."""
        t, g = self.cfg.train, self.cfg.sampling.guidance_scale
        b, s = len(traj), len(traj.sde_steps)
        dev = "cpu" if t.trajectories_on_cpu else self.model.device
        logp = torch.zeros(b, s)
        means = torch.zeros_like(traj.means, device=dev)
        std = torch.zeros(b, s)
        kl_ref = torch.zeros(b, s)
        self.model.module.eval()
        for mb in perm.split(t.minibatch_size):
            for micro in self.dist.split(mb).split(t.micro_batch_size):
                for j in range(s):
                    out = replay_step(self.model, self.kernel, traj, micro, j, g)
                    logp[micro, j] = out.log_prob.cpu()
                    means[micro, j] = out.mean.to(dev)
                    std[micro, j] = out.std.cpu()
                    if t.log_ref_kl:
                        with self.model.disable_adapter():
                            ref = replay_step(self.model, self.kernel, traj, micro, j, g)
                        kl_ref[micro, j] = self.kernel.kl(out.mean, ref.mean, out.std).cpu()
        # each process filled its shares (zeros elsewhere): the sum is the whole batch's anchor
        for x in (logp, means, std) + ((kl_ref,) if t.log_ref_kl else ()):
            self.dist.all_reduce_sum_(x)
        diff = (logp - traj.log_probs.cpu()).abs()
        tol = self.cfg.sampling.replay_tolerance
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

    def train_minibatch(
        self, traj: Trajectories, mb: torch.Tensor, adv: torch.Tensor, anchor: dict
    ) -> dict[str, float]:
        """One optimizer step on samples ``mb``; returns the loss metrics of the whole mini-batch."""
        t, g, spec = self.cfg.train, self.cfg.sampling.guidance_scale, self.loss_spec
        s = len(traj.sde_steps)
        n_entries = len(mb) * s  # the whole mini-batch's, over all processes: the step does not depend on their number
        self.dist.zero_grad(self.optimizer)
        rec: dict[str, list[torch.Tensor]] = {"logp_new": [], "kl": [], "kl_ref": [], "mean_new": [], "idx": []}
        dev = self.model.device
        for micro in self.dist.split(mb).split(t.micro_batch_size):
            cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("logp_new", "kl", "kl_ref", "mean_new")}
            for j in range(s):
                out = replay_step(self.model, self.kernel, traj, micro, j, g)
                mean_old = anchor["means"][micro, j].to(dev)
                std = anchor["std"][micro, j].to(dev)
                kl = self.kernel.kl(out.mean.detach(), mean_old, std)
                kl_ref = None
                if spec.needs_reference:
                    with torch.no_grad(), self.model.disable_adapter():
                        ref = replay_step(self.model, self.kernel, traj, micro, j, g)
                    kl_ref = self.kernel.kl(out.mean, ref.mean, std)[:, None]
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
                self.dist.backward(loss.sum() / n_entries)
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
        grad_norm = self.dist.step(self.optimizer, self.params, t.grad_clip)  # gradients summed over processes
        # metrics of the whole mini-batch (every process's entries) from the same pure loss function
        idx = self.dist.all_gather_cat(torch.cat(rec["idx"]))
        cat = {k: self.dist.all_gather_cat(torch.cat(v, 0)) for k, v in rec.items() if v and k != "idx"}
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

    @torch.no_grad()
    def ratio_noise(self, traj: Trajectories, anchor: dict) -> dict[str, float]:
        """SPEC section 9 on the live run: old means (anchor) vs the updated policy on stored actions."""
        n = min(self.cfg.eval.ratio_noise_samples, len(traj))
        idx = torch.arange(n)
        self.model.module.eval()
        mean_new = torch.stack(
            [
                replay_step(self.model, self.kernel, traj, idx, j, self.cfg.sampling.guidance_scale).mean.cpu()
                for j in range(len(traj.sde_steps))
            ],
            1,
        )
        stats = ratio_noise_report(
            anchor["means"][idx].cpu(),
            mean_new,
            anchor["std"][idx],
            traj.next_latents[idx].cpu(),
            clip_eps=0.2,
            reduction="sum",
            step_indices=traj.sde_steps,
        )
        out = {}
        for st in stats:
            for k in (
                "kl_mean",
                "log_r_mean",
                "log_r_std",
                "log_r_std_pred",
                "ratio_median",
                "clip_low_frac",
                "clip_high_frac",
            ):
                out[f"ratio_noise/step{st.step}/{k}"] = getattr(st, k)
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Deterministic ODE samples of each evaluation set (fixed noise), scored by the reward.

        For the shapes world the result has per-category strict accuracy; for other rewards, the mean
        of each reward component.
        """
        cfg = self.cfg
        self.model.module.eval()
        out: dict[str, Any] = {}
        c, h, w = self.model.latent_shape
        n_rep = cfg.eval.samples_per_prompt
        for name, unique in self.eval_sets.items():
            if not unique:
                continue
            prompts = [p for p in unique for _ in range(n_rep)]
            gen = torch.Generator().manual_seed(cfg.eval.seed)
            bs = cfg.train.rollout_batch_size
            noise = torch.cat(
                [
                    torch.randn((min(bs, len(prompts) - start), c, h, w), generator=gen)
                    for start in range(0, len(prompts), bs)
                ]
            )
            # this process's part of the set, padded so that every process runs the same forwards
            mine, _ = self.dist.padded_share(len(prompts))
            local = [prompts[i] for i in mine.tolist()]
            finals = []
            for start in range(0, len(local), bs):
                sel = mine[start : start + bs]
                finals.append(
                    ode_sample(
                        self.model,
                        self.encode(local[start : start + bs]).to(self.model.device),
                        self.sigmas,
                        noise[sel].to(self.model.device),
                        cfg.sampling.guidance_scale,
                    ).cpu()
                )
            images = self.model.decode(torch.cat(finals).to(self.model.device)).float().cpu()
            scores = {
                k: self.dist.gather_padded(v.float().cpu(), len(prompts))
                for k, v in self.reward_fn(local, images).items()
            }
            for k, v in scores.items():
                out[f"eval/{name}/{k}"] = float(v.mean())
            if self.shapes_world:
                from flowdppo.worlds import shapes

                cats = [shapes.parse_prompt(p).category for p in prompts]
                for cat in sorted(set(cats)):
                    sel = torch.tensor([ci == cat for ci in cats])
                    out[f"eval/{name}/strict/{cat}"] = float(scores["strict"][sel].mean())
        return out

    @torch.no_grad()
    def image_grid(self, path: Path, n_prompts: int | None = None, n_seeds: int = 4) -> Path | None:
        """A PNG grid: rows = the first evaluation prompts, columns = fixed seeds (same before/after)."""
        from flowdppo.report import save_image_grid

        prompts = next(iter(self.eval_sets.values()), [])[: n_prompts or self.cfg.eval.grid_prompts]
        if not prompts:
            return None
        self.model.module.eval()
        c, h, w = self.model.latent_shape
        gen = torch.Generator().manual_seed(self.cfg.eval.seed + 1)
        rows = [p for p in prompts for _ in range(n_seeds)]
        noise = torch.randn((len(rows), c, h, w), generator=gen).to(self.model.device)
        finals = ode_sample(
            self.model, self.encode(rows).to(self.model.device), self.sigmas, noise, self.cfg.sampling.guidance_scale
        )
        images = self.model.decode(finals).float().cpu()
        if not self.dist.is_main:  # every process sampled (FSDP2 needs it); rank 0 writes
            return None
        save_image_grid(images, prompts, n_seeds, path)
        return path

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, sync: bool = True) -> Path:
        """Atomically write ``checkpoints/ckpt-<iteration>`` and point ``checkpoints/latest`` at it.

        With several processes every one calls this (FSDP2 gathers full tensors, DeepSpeed writes its
        shards) and rank 0 writes the files; ``sync=False`` skips the barriers (rank 0 alone, DDP only).
        """
        root = self.run_dir / "checkpoints"
        name = f"ckpt-{self.iteration:06d}"
        tmp, final = root / (name + ".tmp"), root / name
        weights = self.dist.full_state(self.model, self.params)  # full tensors on rank 0, None elsewhere
        optim = self.dist.optimizer_state(self.optimizer)
        if self.dist.is_main:
            root.mkdir(exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.dist.save_engine(tmp)  # DeepSpeed: its sharded optimizer state, from every process
        if sync:
            self.dist.barrier()
        if not self.dist.is_main:
            if sync:
                self.dist.barrier()  # rank 0 has written the files
            return final
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
        torch.save(
            {
                "iteration": self.iteration,
                "optimizer": optim,
                "tracker": self.tracker.state_dict() if self.tracker else None,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "history": self.history,
            },
            tmp / "state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / "latest")
        done = sorted(p for p in root.glob("ckpt-*") if not p.name.endswith(".tmp"))
        for stale in done[:-2]:  # keep the last two
            shutil.rmtree(stale, ignore_errors=True)
        if sync:
            self.dist.barrier()
        return final

    def load_checkpoint(self, path: Path | None = None) -> int:
        root = self.run_dir / "checkpoints"
        if path is None:
            latest = root / "latest"
            if not latest.exists():
                raise FileNotFoundError(f"no checkpoint in {root}: nothing to resume")
            path = root / latest.read_text().strip()
        from safetensors.torch import load_file

        # every process reads the same files (a shared file system for several nodes)
        self.dist.load_state(self.model, self.params, load_file(str(path / "adapter.safetensors")))
        state = torch.load(path / "state.pt", weights_only=False)
        self.dist.load_optimizer_state(self.optimizer, self.params, state["optimizer"])
        self.dist.load_engine(path)
        if self.tracker and state.get("tracker"):
            self.tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.iteration = int(state["iteration"])
        self.history = list(state.get("history", []))
        self.logger.truncate_after(self.iteration - 1)
        return self.iteration

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool | None = None, stop_after: int | None = None) -> Path:
        """Train until ``train.iterations`` (or ``stop_after`` more iterations); returns the run dir.

        On an interruption the finished iterations are checkpointed before the error propagates.
        """
        cfg = self.cfg
        progress = (cfg.log.progress if progress is None else progress) and self.dist.is_main
        end = cfg.train.iterations if stop_after is None else min(cfg.train.iterations, self.iteration + stop_after)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.train.iterations, initial=self.iteration, desc="flowdppo", unit="it", dynamic_ncols=True
            )
        evals_path = self.run_dir / "eval.jsonl"
        try:
            if self.iteration == 0 and self.eval_sets:
                if not self.dist.from_main(evals_path.exists()):
                    self._log_eval(-1, evals_path)
                    self.image_grid(self.run_dir / "grid_before.png")
            while self.iteration < end:
                it = self.iteration
                m = self.iteration_step(it)
                self.iteration = it + 1
                if (
                    self.eval_sets
                    and cfg.eval.every
                    and (self.iteration % cfg.eval.every == 0 or self.iteration == cfg.train.iterations)
                ):
                    tic = time.perf_counter()
                    m.update(self._log_eval(it, evals_path))
                    m["time/eval"] = time.perf_counter() - tic
                self.logger.write(m)
                self.history.append({k: v for k, v in m.items() if not k.startswith("ratio_noise/")})
                if cfg.log.checkpoint_every and self.iteration % cfg.log.checkpoint_every == 0:
                    self.save_checkpoint()
                if bar is not None:
                    post = {"reward": f"{m['reward/total']:.3f}", "kl_ref": f"{m.get('kl_ref', float('nan')):.2e}"}
                    if "masked_frac" in m:
                        post["masked"] = f"{m['masked_frac']:.2f}"
                    if "clip_frac" in m:
                        post["clipped"] = f"{m['clip_frac']:.2f}"
                    acc = [v for k, v in m.items() if k.startswith("eval/eval/strict") and k.count("/") == 2]
                    if acc:
                        post["eval_acc"] = f"{acc[0]:.3f}"
                    bar.set_postfix(post)
                    bar.update(1)
        except BaseException:
            # several processes: the others may be gone, so only rank 0 of a DDP run saves, without barriers
            if self.iteration > 0 and (not self.dist.active or (self.dist.is_main and self.dist.sharding == "ddp")):
                self.save_checkpoint(sync=not self.dist.active)
                log.warning("interrupted: iterations 0..%d checkpointed in %s", self.iteration - 1, self.run_dir)
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.iteration >= cfg.train.iterations:
            self.save_checkpoint()
            if self.eval_sets:
                self.image_grid(self.run_dir / "grid_after.png")
            with self.dist.full_params(self.model.module):  # FSDP2: whole weights for the export
                if self.dist.is_main:
                    self.model.save_adapter(str(self.run_dir / "adapter"))
            if self.dist.is_main:
                from flowdppo.report import write_report

                write_report(self.run_dir)
            self.dist.barrier()
        self.logger.close()
        return self.run_dir

    def _log_eval(self, it: int, path: Path) -> dict[str, Any]:
        res = self.evaluate()
        if self.dist.is_main:
            with open(path, "a") as f:
                f.write(json.dumps({"iteration": it, **res}) + "\n")
        return res


def _mean_metrics(ms: list[dict[str, float]]) -> dict[str, float]:
    """Average per-mini-batch metrics; extremes keep their meaning (min of mins, max of maxes)."""
    out: dict[str, float] = {}
    for k in ms[0]:
        vals = [m[k] for m in ms if k in m]
        if k.endswith("_min"):
            out[k] = min(vals)
        elif k.endswith("_max"):
            out[k] = max(vals)
        else:
            out[k] = float(np.mean(vals))
    return out


def _read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def resume(run_dir: str | os.PathLike, overrides: list[str] | None = None, **kwargs: Any) -> Trainer:
    """A trainer for ``run_dir`` restored from its latest checkpoint (config from ``run_dir/config.yaml``)."""
    from flowdppo.config import load_run_config

    cfg = load_run_config(str(run_dir), overrides)
    trainer = Trainer(cfg, run_dir=run_dir, **kwargs)
    trainer.load_checkpoint()
    return trainer

"""The RL loop: docs/flow-dppo.md, section "One iteration", with checkpoint and resume.

1. pick the SDE steps and the prompts, roll out ``G`` samples each (:meth:`Trainer.collect`);
2. score them and compute advantages;
3. freeze the anchor: the rollout's own log-probs and means when they are exact (``train.anchor``), else
   a no-grad replay at the current weights in the first epoch's micro-batches;
4. ``inner_epochs`` passes over the batch in mini-batches, one optimizer step each (:mod:`.update`);
5. log (:mod:`.runlog`), evaluate (:mod:`.evaluation`), checkpoint (:mod:`.checkpoint`).

No maths of its own and no world by name: prompts come from :mod:`flowdppo.training.prompts`. Every
random draw of an iteration comes from generators seeded by ``(seed, iteration)``, so a resumed run
reproduces the uninterrupted one. Under ``torchrun`` / ``accelerate launch`` (:mod:`.distributed`)
each process rolls out its share, and rewards, trajectories, anchor, gradients and metrics are
exchanged so that the update is the one-process update; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
from flowdppo.core.losses import LossSpec
from flowdppo.core.steps import StepSelection
from flowdppo.models import FlowModel, build_model
from flowdppo.models.base import Cond
from flowdppo.rewards import build_eval_reward, build_reward
from flowdppo.rewards.overlap import ChunkScorer
from flowdppo.training import checkpoint as ckpt
from flowdppo.training import update
from flowdppo.training.distributed import Dist, enable_gradient_checkpointing
from flowdppo.training.evaluation import Evaluator, ratio_noise
from flowdppo.training.prompts import prompt_source
from flowdppo.training.rollout import Trajectories, rollout, sampling_schedule
from flowdppo.training.runlog import Progress, mean_metrics, run_logger

log = logging.getLogger("flowdppo")


def _seed_for(seed: int, iteration: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, iteration, purpose)."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(stream)]).generate_state(1)[0])


def _gen(seed: int, iteration: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, iteration, stream))


class Trainer:
    """Flow-DPPO and its baselines over any :class:`FlowModel`.

    ``model``, ``reward_fn``, ``prompts`` and ``eval_sets`` default to what the config names: the
    model family, the reward, and the prompts of :func:`flowdppo.training.prompts.prompt_source`.
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
        self.cfg, s, t, a = cfg, cfg.sampling, cfg.train, cfg.algorithm
        # several processes (torchrun / accelerate launch): see flowdppo.training.distributed; one process by default
        self.dist = dist if dist is not None else Dist.from_env(cfg.model.device)
        self.dist.check_batch(t.prompts_per_iter * t.group_size, t.minibatch_size)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.log.run_dir) / cfg.log.name
        if self.dist.is_main and self.run_dir.exists() and any(self.run_dir.iterdir()) and overwrite:
            shutil.rmtree(self.run_dir)
        self.dist.barrier()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(t.seed)
        if model is None:
            model = build_model(dataclasses.replace(cfg.model, device=self.dist.model_device(cfg.model.device)))
        self.model = model
        cache: dict = {}  # components with the same name and args are one instance (training and evaluation)
        self.reward_fn = reward_fn if reward_fn is not None else build_reward(cfg.reward, cache)
        self.eval_reward_fn = build_eval_reward(cfg.reward, cache) or self.reward_fn
        source = prompt_source(cfg, prompts, eval_sets)
        self.train_prompts, self.eval_sets = source.train, source.eval_sets
        self.sigmas, self.kernel = sampling_schedule(self.model, s)
        knobs = dict(delta=a.delta, clip_eps=a.clip_eps, loss_adv_clip=a.loss_adv_clip, beta=a.beta, args=a.loss_args)
        self.loss_spec = LossSpec(name=a.loss, **knobs)
        self.step_sel = StepSelection(**asdict(cfg.steps))
        if not any(p.requires_grad for p in self.model.trainable_parameters()):
            raise ValueError("the model has no trainable parameters (enable model.lora or full fine-tuning)")
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.params, self.optimizer = update.prepare_optimizer(self.model, self.dist, cfg)
        self.reuse_anchor = update.reuse_anchor(cfg, self.model)  # train.anchor; auto may fall back to replay
        self.tracker = adv_lib.PerPromptStatTracker(global_std=a.advantage_std == "global") if a.stat_tracker else None
        self.iteration = 0  # completed iterations
        self.history: list[dict[str, Any]] = []
        self.logger = run_logger(self.run_dir, cfg.log.tensorboard, self.dist.is_main)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self._prompt_cache: dict[str, Cond] = {}
        self.evaluator = Evaluator.for_run(
            cfg, self.model, self.sigmas, self.encode, self.eval_reward_fn, source, self.dist
        )

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
        # each chunk's images are scored in a background thread while the next chunk samples
        scorer = ChunkScorer(
            self.reward_fn, lambda x: self.model.decode(x.to(self.model.device)), background=t.overlap_reward
        )
        mine = prompts[part]
        try:
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
                on_chunk=lambda idx, out: scorer.submit(mine[idx], out["final"]),
            )
        except BaseException:
            scorer.close()
            raise
        traj = self.dist.gather_trajectories(traj, prompts, group_ids, cond)
        timing["time/rollout"] = time.perf_counter() - tic

        # 2. rewards, joined (gathered: advantages see the whole batch, identically on every process)
        tic = time.perf_counter()
        rewards = {k: self.dist.all_gather_cat(v) for k, v in scorer.join().items()}
        adv, reward_metrics = self.advantages(prompts, group_ids, rewards)
        timing["time/reward"] = time.perf_counter() - tic
        return traj, adv, reward_metrics, timing

    def iteration_step(self, it: int) -> dict[str, Any]:
        """Run iteration ``it`` (0-based) and return its metrics."""
        cfg, t = self.cfg, self.cfg.train
        traj, adv, reward_metrics, timing = self.collect(it)
        sde_steps = traj.sde_steps

        # 3. anchor: the rollout's own values or a replay in the micro-batches of the first epoch
        tic = time.perf_counter()
        perms = [torch.randperm(len(traj), generator=_gen(t.seed, it, 2 + e)) for e in range(t.inner_epochs)]
        anchor = self.anchor(traj, perms[0])
        if anchor["metrics"].get("anchor/fallback"):
            self.reuse_anchor = False
        ref_kl = self.reference_kl(traj, perms[0], anchor) if self._measure_ref_kl(it) else {}
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
        metrics.update(mean_metrics(mb_metrics))
        metrics.update(
            {f"first_mb/{k}": mb_metrics[0][k] for k in ("ratio_min", "ratio_max", "kl_max") if k in mb_metrics[0]}
        )
        metrics["num_optimizer_steps"] = len(mb_metrics)
        metrics.update(anchor["metrics"])
        metrics.update(ref_kl)
        if cfg.eval.ratio_noise_every and it % cfg.eval.ratio_noise_every == 0:
            tic = time.perf_counter()
            metrics.update(self.ratio_noise(traj, anchor))
            timing["time/ratio_noise"] = time.perf_counter() - tic
        metrics.update(timing)
        return metrics

    def advantages(self, prompts, group_ids, rewards: dict[str, torch.Tensor]):
        """Step 2's advantages ``[B]`` and reward metrics from the whole batch's reward components."""
        a = self.cfg.algorithm
        w = getattr(self.reward_fn, "weights", None) or self.cfg.reward.weights  # components: their own weights
        kw = dict(std=a.advantage_std, clip=a.norm_adv_clip, multi_reward=a.multi_reward, tracker=self.tracker)
        try:
            return adv_lib.batch_advantages(rewards, w, prompts, group_ids, **kw)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def anchor(self, traj: Trajectories, perm: torch.Tensor) -> dict[str, Any]:
        """Step 3: frozen old log-probs, means and stds (:func:`update.anchor`)."""
        return update.anchor(self.model, self.kernel, self.dist, self.cfg, traj, perm, reuse=self.reuse_anchor)

    def _measure_ref_kl(self, it: int) -> bool:
        """The beta = 0 reference-KL diagnostic runs this iteration (at beta > 0 training computes it)."""
        t = self.cfg.train
        return t.log_ref_kl and not self.loss_spec.needs_reference and t.ref_kl_every > 0 and it % t.ref_kl_every == 0

    def reference_kl(self, traj: Trajectories, perm: torch.Tensor, anchor: dict) -> dict[str, float]:
        """KL of the anchor to the reference policy on ``train.ref_kl_samples`` samples of ``perm``
        (all with 0; a multiple of the process count) (:func:`update.reference_kl`)."""
        b, world = len(traj), self.dist.world
        n = min(self.cfg.train.ref_kl_samples or b, b)
        n = max(world, n - n % world)
        return update.reference_kl(self.model, self.kernel, self.dist, self.cfg, traj, perm[:n], anchor)

    def train_minibatch(self, traj: Trajectories, mb: torch.Tensor, adv: torch.Tensor, anchor: dict) -> dict:
        """Step 4: one optimizer step on samples ``mb`` (:func:`update.minibatch_step`)."""
        m, k, d = self.model, self.kernel, self.dist
        return update.minibatch_step(
            m, k, d, self.cfg, self.loss_spec, self.optimizer, self.params, traj, mb, adv, anchor
        )

    def ratio_noise(self, traj: Trajectories, anchor: dict) -> dict[str, float]:
        """docs/flow-dppo.md, section "Ratio noise", on the live run (:func:`evaluation.ratio_noise`)."""
        n, g = self.cfg.eval.ratio_noise_samples, self.cfg.sampling.guidance_scale
        return ratio_noise(self.model, self.kernel, traj, anchor, n, g)

    # ------------------------------------------------------------------ evaluation, checkpoints

    def evaluate(self) -> dict[str, Any]:
        """Fixed-noise ODE samples of each evaluation set, scored (:class:`evaluation.Evaluator`)."""
        return self.evaluator.evaluate()

    def image_grid(self, path: Path, n_prompts: int | None = None, n_seeds: int = 4) -> Path | None:
        return self.evaluator.grid(path, n_prompts, n_seeds)

    def save_checkpoint(self, sync: bool = True) -> Path:
        """``checkpoints/ckpt-<iteration>`` (:func:`checkpoint.save_checkpoint`); every process calls it."""
        parts = (self.dist, self.model, self.params, self.optimizer, self.tracker)
        return ckpt.save_checkpoint(self.run_dir, *parts, self.iteration, self.history, sync)

    def load_checkpoint(self, path: Path | None = None) -> int:
        """Restore ``path`` (default: the latest checkpoint); returns the completed iterations."""
        path = ckpt.latest_checkpoint(self.run_dir) if path is None else path
        parts = (self.dist, self.model, self.params, self.optimizer, self.tracker)
        self.iteration, self.history = ckpt.load_checkpoint(path, *parts)
        self.logger.truncate_after(self.iteration - 1)
        return self.iteration

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool | None = None, stop_after: int | None = None) -> Path:
        """Train until ``train.iterations`` (or ``stop_after`` more iterations); returns the run dir.

        On an interruption the finished iterations are checkpointed before the error propagates.
        """
        cfg = self.cfg
        end = cfg.train.iterations if stop_after is None else min(cfg.train.iterations, self.iteration + stop_after)
        show = (cfg.log.progress if progress is None else progress) and self.dist.is_main
        bar = Progress(show, cfg.train.iterations, self.iteration)
        try:
            if self.iteration == 0 and self.eval_sets:
                if not self.dist.from_main((self.run_dir / "eval.jsonl").exists()):
                    self._log_eval(-1)
                    self.image_grid(self.run_dir / "grid_before.png")
            while self.iteration < end:
                it = self.iteration
                m = self.iteration_step(it)
                self.iteration = it + 1
                if self._eval_due():
                    tic = time.perf_counter()
                    m.update(self._log_eval(it))
                    m["time/eval"] = time.perf_counter() - tic
                self.logger.write(m)
                self.history.append({k: v for k, v in m.items() if not k.startswith("ratio_noise/")})
                if cfg.log.checkpoint_every and self.iteration % cfg.log.checkpoint_every == 0:
                    self.save_checkpoint()
                bar.update(m)
        except BaseException:
            # several processes: the others may be gone, so only rank 0 of a DDP run saves, without barriers
            if self.iteration > 0 and (not self.dist.active or (self.dist.is_main and self.dist.sharding == "ddp")):
                self.save_checkpoint(sync=not self.dist.active)
                log.warning("interrupted: iterations 0..%d checkpointed in %s", self.iteration - 1, self.run_dir)
            raise
        finally:
            bar.close()
        if self.iteration >= cfg.train.iterations:
            self.finish()
        self.logger.close()
        return self.run_dir

    def finish(self) -> None:
        """After the last iteration: checkpoint, the grid after training, the exported adapter, the report."""
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

    def _eval_due(self) -> bool:
        """After every ``eval.every`` iterations and after the last one (never when ``eval.every`` is 0)."""
        every, n = self.cfg.eval.every, self.iteration
        return bool(self.eval_sets) and every > 0 and (n % every == 0 or n == self.cfg.train.iterations)

    def _log_eval(self, it: int) -> dict[str, Any]:
        res = self.evaluate()
        self.logger.write_eval(it, res)
        return res


def resume(run_dir: str | os.PathLike, overrides: list[str] | None = None, **kwargs: Any) -> Trainer:
    """A trainer for ``run_dir`` restored from its latest checkpoint (config from ``run_dir/config.yaml``)."""
    from flowdppo.config import load_run_config

    cfg = load_run_config(str(run_dir), overrides)
    trainer = Trainer(cfg, run_dir=run_dir, **kwargs)
    trainer.load_checkpoint()
    return trainer

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

from flowdppo.config import Config, ConfigError, check_reward_components
from flowdppo.core import advantages as adv_lib
from flowdppo.core.losses import LossSpec
from flowdppo.core.steps import StepSelection
from flowdppo.errors import NonFiniteError, UserError, one_line, os_reason
from flowdppo.models import FlowModel, build_model
from flowdppo.models.base import Cond
from flowdppo.models.lora_forward import resolve_lora_forward, use_merged_lora_forward
from flowdppo.rewards import build_eval_reward, build_reward
from flowdppo.rewards.overlap import ChunkScorer
from flowdppo.training import checkpoint as ckpt
from flowdppo.training import faults, update
from flowdppo.training.distributed import Dist, enable_gradient_checkpointing
from flowdppo.training.evaluation import Evaluator, ratio_noise
from flowdppo.training.prompts import prompt_source
from flowdppo.training.rollout import Trajectories, rollout, sampling_schedule
from flowdppo.training.runlog import Progress, mean_metrics, read_jsonl, run_logger

log = logging.getLogger("flowdppo")


def _seed_for(seed: int, iteration: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, iteration, purpose)."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(stream)]).generate_state(1)[0])


def _gen(seed: int, iteration: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, iteration, stream))


def check_rewards(rewards: dict[str, torch.Tensor], prompts: Sequence[str], it: int) -> None:
    """Every reward component finite and one value per sample, else an error naming the component and
    the sample (before any optimizer step of the iteration)."""
    for k, v in rewards.items():
        if v.shape != (len(prompts),):
            raise ValueError(f"reward component {k!r} has shape {list(v.shape)}, expected [{len(prompts)}]")
        bad = (~torch.isfinite(v)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise NonFiniteError(
                f"reward component {k!r} is {float(v[i])} for sample {i} (prompt {prompts[i]!r}) of iteration {it}"
                f" ({len(bad)} non-finite in all); no optimizer step was taken"
            )


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
        resuming: bool = False,
    ):
        self.cfg, s, t, a = cfg, cfg.sampling, cfg.train, cfg.algorithm
        # several processes (torchrun / accelerate launch): see flowdppo.training.distributed; one process by default
        self.dist = dist if dist is not None else Dist.from_env(cfg.model.device, t.dist_timeout)
        self.dist.check_batch(t.prompts_per_iter * t.group_size, t.minibatch_size)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.log.run_dir) / cfg.log.name
        self._prepare_run_dir(overwrite, resuming)
        torch.manual_seed(t.seed)
        if model is None:
            model = build_model(dataclasses.replace(cfg.model, device=self.dist.model_device(cfg.model.device)))
        self.model = model
        if reward_fn is None:
            check_reward_components(cfg)  # reward.weights against the components the reward declares
        cache: dict = {}  # components with the same name and args are one instance (training and evaluation)
        self.reward_fn = reward_fn if reward_fn is not None else build_reward(cfg.reward, cache)
        self.eval_reward_fn = build_eval_reward(cfg.reward, cache) or self.reward_fn
        source = prompt_source(cfg, prompts, eval_sets)
        self.train_prompts, self.eval_sets = source.train, source.eval_sets
        self.train_probs = source.train_probs  # None: uniform (the draws of runs without category weights)
        self.sigmas, self.kernel = sampling_schedule(self.model, s)
        knobs = dict(delta=a.delta, clip_eps=a.clip_eps, loss_adv_clip=a.loss_adv_clip, beta=a.beta, args=a.loss_args)
        self.loss_spec = LossSpec(name=a.loss, **knobs)
        self.step_sel = StepSelection(**asdict(cfg.steps))
        if not any(p.requires_grad for p in self.model.trainable_parameters()):
            raise ValueError("the model has no trainable parameters (enable model.lora or full fine-tuning)")
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.lora_forward = self._route_lora_forward()
        self.params, self.optimizer = update.prepare_optimizer(self.model, self.dist, cfg)
        self.reuse_anchor = update.reuse_anchor(cfg, self.model)  # train.anchor; auto may fall back to replay
        self.keep_rollout_graph = update.keep_rollout_graph(cfg, self.model, self.dist, self.reuse_anchor)
        self.tracker = adv_lib.PerPromptStatTracker(global_std=a.advantage_std == "global") if a.stat_tracker else None
        self.iteration = 0  # completed iterations
        self.history: list[dict[str, Any]] = []
        # the log lines written so far, saved with each checkpoint: a resumed run rewrites its logs from them
        self.records: dict[str, list[dict[str, Any]]] = {"metrics": [], "eval": []}
        self.logger = run_logger(self.run_dir, cfg.log.tensorboard, self.dist.is_main)
        if self.dist.is_main and not resuming:
            self._write_run_file("config.yaml", cfg.to_yaml())
        self._prompt_cache: dict[str, Cond] = {}
        self.evaluator = Evaluator.for_run(
            cfg, self.model, self.sigmas, self.encode, self.eval_reward_fn, source, self.dist
        )

    def _route_lora_forward(self) -> str:
        """``model.lora_forward`` resolved for this model (``merged`` / ``separate``), applied to its LoRA
        layers before the optimizer and the sharding wrap them (:mod:`flowdppo.models.lora_forward`)."""
        cfg = self.cfg
        if getattr(self.model, "lora_config", None) is None:
            return "separate"  # full fine-tuning or a model without peft layers: nothing to route
        dtype = getattr(self.model, "dtype", torch.float32)
        try:
            mode = resolve_lora_forward(cfg.model.lora_forward, dtype, cfg.train.sharding, self.dist.world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if mode == "merged":
            use_merged_lora_forward(self.model.module)
        return mode

    def _prepare_run_dir(self, overwrite: bool, resuming: bool) -> None:
        """Create the run directory; an existing non-empty one is refused unless ``--overwrite``
        (replaced) or ``--resume`` (continued): two runs never mix in one folder."""
        d = self.run_dir
        used = self.dist.from_main(d.is_dir() and any(d.iterdir()))
        if used and not (overwrite or resuming):
            raise UserError(
                f"run directory {d} already holds a run; continue it with flowdppo train --resume {d}, "
                "replace it with --overwrite, or choose another --name"
            )
        try:
            if self.dist.is_main and used and overwrite and not resuming:
                shutil.rmtree(d)
            self.dist.barrier()
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write the run directory {d}: {os_reason(e)}") from None

    def _write_run_file(self, name: str, text: str) -> None:
        path = self.run_dir / name
        try:
            path.write_text(text)
        except OSError as e:
            raise UserError(f"cannot write the run directory {self.run_dir}: {os_reason(e)}") from None

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Conditioning for ``prompts``: each unique prompt encoded once, on its own (so its encoding
        never depends on which prompts it came with: a resumed run is bit-exact), and cached."""
        g = self.cfg.sampling.guidance_scale
        for p in dict.fromkeys(prompts):
            if p not in self._prompt_cache:
                with torch.no_grad():
                    self._prompt_cache[p] = self.model.encode_prompts([p], g).to("cpu")
        return Cond.cat([self._prompt_cache[p] for p in prompts])

    # ------------------------------------------------------------------ one iteration

    def collect(
        self, it: int, prompt_iteration: int | None = None, keep_graph: bool = False
    ) -> tuple[Trajectories, torch.Tensor, dict[str, float], dict[str, float]]:
        """Steps 1-2 of iteration ``it``: roll out (every draw seeded by ``(seed, it)``), score, and compute
        advantages. ``prompt_iteration`` draws the prompts of another iteration (same prompts, new noise).
        ``keep_graph``: keep the trained steps' graphs (``traj.velocities``; :meth:`iteration_step` asks for
        them when ``train.rollout_graph`` applies). Returns ``(trajectories, advantages [B], reward metrics,
        timing)``."""
        cfg, t = self.cfg, self.cfg.train
        timing: dict[str, float] = {}
        faults.at("rollout", it)
        tic = time.perf_counter()
        sde_steps = self.step_sel.select(cfg.sampling.num_steps, t.seed, it)
        rng = np.random.default_rng(_seed_for(t.seed, it if prompt_iteration is None else prompt_iteration, 0))
        chosen = [
            self.train_prompts[i]
            for i in rng.choice(
                len(self.train_prompts),
                t.prompts_per_iter,
                replace=len(self.train_prompts) < t.prompts_per_iter,
                p=self.train_probs,
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
                keep_graph=keep_graph,
            )
        except BaseException:
            scorer.close()
            raise
        timing["time/rollout"] = time.perf_counter() - tic

        # 2. rewards, joined (gathered: advantages see the whole batch, identically on every process)
        tic = time.perf_counter()
        rewards = {k: self.dist.all_gather_cat(v) for k, v in scorer.join().items()}
        faults.at("reward", it)
        check_rewards(rewards, prompts, it)
        adv, reward_metrics = self.advantages(prompts, group_ids, rewards)
        timing["time/reward"] = time.perf_counter() - tic
        return traj, adv, reward_metrics, timing

    def iteration_step(self, it: int) -> dict[str, Any]:
        """Run iteration ``it`` (0-based) and return its metrics."""
        cfg, t = self.cfg, self.cfg.train
        traj, adv, reward_metrics, timing = self.collect(it, keep_graph=self.keep_rollout_graph)
        sde_steps = traj.sde_steps

        # 3. anchor: the rollout's own values or a replay in the micro-batches of the first epoch
        faults.at("anchor", it)
        tic = time.perf_counter()
        perms = [
            update.minibatch_permutation(len(traj), t.minibatch_size, _gen(t.seed, it, 2 + e))
            for e in range(t.inner_epochs)
        ]
        anchor = self.anchor(traj, perms[0])
        # the rollout's graphs (train.rollout_graph), handed to the first optimizer step: the only one, at the
        # rollout's weights; dropped if the anchor falls back to a replay (rollout and training then differ)
        graph, traj.velocities = traj.velocities, None
        if anchor["metrics"].get("anchor/fallback"):
            self.reuse_anchor = False
            self.keep_rollout_graph, graph = False, None
        ref_kl = self.reference_kl(traj, perms[0], anchor) if self._measure_ref_kl(it) else {}
        timing["time/anchor"] = time.perf_counter() - tic

        # 4. inner epochs
        tic = time.perf_counter()
        self.model.module.train()
        mb_metrics = []
        for perm in perms:
            for mb in perm.split(t.minibatch_size):
                mb_metrics.append(self.train_minibatch(traj, mb, adv, anchor, velocities=graph))
                graph = None
                if len(mb_metrics) == 1:
                    faults.at("train", it)  # after the first optimizer step: a half-updated model
        timing["time/train"] = time.perf_counter() - tic

        metrics: dict[str, Any] = {"iteration": it, "sde_steps": sde_steps}
        metrics.update(reward_metrics)
        metrics.update(mean_metrics(mb_metrics))
        metrics.update(
            {f"first_mb/{k}": mb_metrics[0][k] for k in ("ratio_min", "ratio_max", "kl_max") if k in mb_metrics[0]}
        )
        metrics["num_optimizer_steps"] = len(mb_metrics)
        metrics["train/rollout_graph"] = float(bool(self.keep_rollout_graph))
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
        w = getattr(self.reward_fn, "weights", None)  # a components reward carries its own weights
        if w is None:
            w = self.cfg.reward.weights
        kw = dict(std=a.advantage_std, clip=a.norm_adv_clip, multi_reward=a.multi_reward, tracker=self.tracker)
        try:
            return adv_lib.batch_advantages(rewards, w, prompts, group_ids, **kw)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def anchor(self, traj: Trajectories, perm: torch.Tensor) -> dict[str, Any]:
        """Step 3: frozen old log-probs, means and stds (:func:`update.anchor`)."""
        return update.anchor(self.model, self.kernel, self.dist, self.cfg, traj, perm, reuse=self.reuse_anchor)

    def _measure_ref_kl(self, it: int) -> bool:
        """The beta = 0 reference-KL diagnostic runs this iteration (at beta > 0 training computes it): every
        ``train.ref_kl_every`` iterations, and always on the last one and on those an evaluation follows (so
        that every evaluated accuracy has its KL to the reference)."""
        t = self.cfg.train
        if not t.log_ref_kl or self.loss_spec.needs_reference or t.ref_kl_every <= 0:
            return False
        return it % t.ref_kl_every == 0 or it + 1 == t.iterations or self._eval_due(it + 1)

    def reference_kl(self, traj: Trajectories, perm: torch.Tensor, anchor: dict) -> dict[str, float]:
        """KL of the anchor to the reference policy on about ``train.ref_kl_samples`` samples of ``perm``
        (all with 0), as many on every process (:func:`update.reference_kl`)."""
        t = self.cfg.train
        idx = update.spread_subsample(perm, t.minibatch_size, t.ref_kl_samples, self.dist.world)
        return update.reference_kl(self.model, self.kernel, self.dist, self.cfg, traj, idx, anchor)

    def train_minibatch(
        self, traj: Trajectories, mb: torch.Tensor, adv: torch.Tensor, anchor: dict, velocities: list | None = None
    ) -> dict:
        """Step 4: one optimizer step on samples ``mb`` (:func:`update.minibatch_step`); ``velocities``: the
        rollout's, with their graphs, to back-propagate through instead of recomputing (consumed)."""
        m, k, d = self.model, self.kernel, self.dist
        return update.minibatch_step(
            m, k, d, self.cfg, self.loss_spec, self.optimizer, self.params, traj, mb, adv, anchor, velocities
        )

    def ratio_noise(self, traj: Trajectories, anchor: dict) -> dict[str, float]:
        """docs/flow-dppo.md, section "Ratio noise", on the live run (:func:`evaluation.ratio_noise`)."""
        n, g = self.cfg.eval.ratio_noise_samples, self.cfg.sampling.guidance_scale
        return self.dist.from_main(ratio_noise(self.model, self.kernel, traj, anchor, n, g))

    # ------------------------------------------------------------------ evaluation, checkpoints

    def evaluate(self) -> dict[str, Any]:
        """Fixed-noise ODE samples of each evaluation set, scored (:class:`evaluation.Evaluator`)."""
        return self.evaluator.evaluate()

    def image_grid(self, path: Path, n_prompts: int | None = None, n_seeds: int = 4) -> Path | None:
        return self.evaluator.grid(path, n_prompts, n_seeds)

    def save_checkpoint(self, sync: bool = True, snap: ckpt.Snapshot | None = None) -> Path:
        """``checkpoints/ckpt-<iteration>`` (:func:`checkpoint.save_checkpoint`); every process calls it.
        ``snap``: write that boundary snapshot instead of the live state."""
        parts = (self.dist, self.model, self.params, self.optimizer, self.tracker)
        return ckpt.save_checkpoint(
            self.run_dir, *parts, self.iteration, self.history, sync, records=self.records, snap=snap
        )

    def load_checkpoint(self, path: Path | None = None) -> int:
        """Restore ``path`` (default: the latest complete checkpoint, else the one before it when that is
        corrupt); returns the completed iterations. The logs are rewritten as they were at that checkpoint."""
        candidates = [Path(path)] if path is not None else ckpt.find_loadable(self.run_dir)
        parts = (self.dist, self.model, self.params, self.optimizer, self.tracker)
        for i, p in enumerate(candidates):
            try:
                self.iteration, self.history, records = ckpt.load_checkpoint_records(p, *parts)
                break
            except UserError as e:
                if i == len(candidates) - 1:
                    raise
                log.warning("%s; resuming from %s instead", e, candidates[i + 1].name)
        if records:
            self.records = {k: list(v) for k, v in records.items()}
            self.logger.restore(self.records)
        else:  # a checkpoint from before the records were saved: trim the files
            self.logger.truncate_after(self.iteration - 1)
            self.records = {
                "metrics": read_jsonl(self.run_dir / "metrics.jsonl"),
                "eval": read_jsonl(self.run_dir / "eval.jsonl"),
            }
        # an auto anchor that fell back to replay before the checkpoint keeps replaying after it
        if any(h.get("anchor/fallback") for h in self.history):
            self.reuse_anchor = False
            self.keep_rollout_graph = False
        return self.iteration

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool | None = None, stop_after: int | None = None) -> Path:
        """Train until ``train.iterations`` (or ``stop_after`` more iterations); returns the run dir.

        Iterations are atomic. Each starts from a snapshot of the boundary state; its metrics and
        evaluation are computed first and committed together (the iteration count, the history and
        the log lines), then written. On any interruption (Ctrl-C, SIGTERM via the CLI, an exception)
        the model is rolled back to the last boundary and that boundary is checkpointed, so a resumed
        run continues exactly where the uninterrupted one would be; after SIGKILL the previous
        checkpoint holds, and resuming from it rewrites the logs from the lines saved with it.
        """
        cfg = self.cfg
        end = cfg.train.iterations if stop_after is None else min(cfg.train.iterations, self.iteration + stop_after)
        show = (cfg.log.progress if progress is None else progress) and self.dist.is_main
        bar = Progress(show, cfg.train.iterations, self.iteration)
        snap: ckpt.Snapshot | None = None
        committed = True  # the live state is an iteration boundary
        try:
            pre_eval = any(r.get("iteration") == -1 for r in self.records["eval"])
            if self.iteration == 0 and self.eval_sets and not self.dist.from_main(pre_eval):
                snap = self._snapshot()
                committed = False
                self._log_eval(-1)
                self.image_grid(self.run_dir / "grid_before.png")
                committed = True
            while self.iteration < end:
                it = self.iteration
                snap = self._snapshot()
                committed = False
                m = self.iteration_step(it)
                done = it + 1
                res = None
                if self._eval_due(done):
                    faults.at("eval", it)
                    tic = time.perf_counter()
                    res = self.evaluate()
                    m.update(res)
                    m["time/eval"] = time.perf_counter() - tic
                # commit: the iteration is complete in memory; from here on the live state is its boundary
                self.iteration = done
                self.history.append({k: v for k, v in m.items() if not k.startswith("ratio_noise/")})
                self.records["metrics"].append(m)
                if res is not None:
                    self.records["eval"].append({"iteration": it, **res})
                committed = True
                if res is not None:
                    self.logger.write_eval(it, res)
                self.logger.write(m)
                if cfg.log.checkpoint_every and self.iteration % cfg.log.checkpoint_every == 0:
                    self.save_checkpoint()
                bar.update(m)
        except BaseException as e:
            self._on_failure(e, None if committed else snap)
            raise
        finally:
            bar.close()
        if self.iteration >= cfg.train.iterations:
            self.finish()
        self.logger.close()
        return self.run_dir

    def _snapshot(self) -> ckpt.Snapshot | None:
        if not ckpt.can_snapshot(self.dist):
            return None
        parts = (self.dist, self.model, self.optimizer, self.tracker)
        return ckpt.snapshot(*parts, self.iteration, self.history, self.records)

    def _on_failure(self, e: BaseException, snap: ckpt.Snapshot | None) -> None:
        """Roll an interrupted iteration back to its start and checkpoint the last boundary; the note
        attached to ``e`` (``flowdppo_note``) says what was saved and how to resume."""
        if snap is not None:
            ckpt.restore(snap, self.model, self.optimizer, self.tracker)
            self.iteration, self.history = snap.iteration, list(snap.history)
            self.records = {k: list(v) for k, v in snap.records.items()}
        # several processes: the others may be gone, so only rank 0 of a DDP run saves, without barriers
        can_save = not self.dist.active or (self.dist.is_main and self.dist.sharding == "ddp")
        note = None
        root = self.run_dir / "checkpoints"
        if can_save:
            name = f"ckpt-{self.iteration:06d}"
            latest = root / "latest"
            have = (
                latest.exists()
                and latest.read_text().strip() == name
                and (root / name) in ckpt.complete_checkpoints(root)
            )
            try:
                if not have:  # the rolled-back snapshot, or the live state of a committed boundary
                    self.save_checkpoint(sync=not self.dist.active, snap=snap)
                    have = True
            except BaseException as save_error:  # noqa: BLE001 - report the first failure, keep the old checkpoint
                note = f"could not checkpoint ({one_line(save_error)}); the previous checkpoint is kept"
            if have and note is None:
                done = f"iterations 0..{self.iteration - 1}" if self.iteration else "no iteration"
                note = f"{done} checkpointed in {root / name}; continue with: flowdppo train --resume {self.run_dir}"
        elif self.dist.is_main:
            note = "the last periodic checkpoint is kept (sharded runs do not save on interruption)"
        if note:
            log.debug("interrupted: %s", note)
            try:
                e.flowdppo_note = note
            except AttributeError:  # pragma: no cover - exceptions without a __dict__
                log.warning("interrupted: %s", note)

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

    def _eval_due(self, done: int) -> bool:
        """An evaluation follows ``done`` trained iterations: every ``eval.every`` and after the last one
        (never when ``eval.every`` is 0 or there is nothing to evaluate)."""
        every = self.cfg.eval.every
        return bool(self.eval_sets) and every > 0 and (done % every == 0 or done == self.cfg.train.iterations)

    def _log_eval(self, it: int) -> dict[str, Any]:
        res = self.evaluate()
        self.records["eval"].append({"iteration": it, **res})
        self.logger.write_eval(it, res)
        return res


def resume(run_dir: str | os.PathLike, overrides: list[str] | None = None, **kwargs: Any) -> Trainer:
    """A trainer for ``run_dir`` restored from its latest checkpoint (config from ``run_dir/config.yaml``)."""
    from flowdppo.config import load_run_config

    cfg = load_run_config(str(run_dir), overrides)
    trainer = Trainer(cfg, run_dir=run_dir, resuming=True, **kwargs)
    trainer.load_checkpoint()
    return trainer

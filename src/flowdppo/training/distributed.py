"""Several processes, one update: the process group, the split of the work and the exchanges.

How N processes (``torchrun`` or ``accelerate launch``, one or several nodes) run an iteration
(docs/flow-dppo.md, section "One iteration") so that an update is the one a single process makes on
the same batch, to float tolerance:

- Every process draws the iteration's randomness for the *whole* batch from the same seeded CPU
  generators (prompts, initial and SDE noise, the permutations); each rolls out only its contiguous
  ``B / N`` samples (:meth:`Dist.share`), so one prompt's group may span processes.
- Samples stay where they were rolled out: a process keeps its own trajectories, scores them, holds
  their anchor means and trains on them (:class:`~flowdppo.training.rollout.Trajectories` holds this
  process's share and maps global sample indices to its rows). Only per-sample scalars travel: the
  rewards are all-gathered so that advantages are computed on the whole batch, identically on every
  process (a group split across processes is normalised as one group), and the anchor's log-probs and
  stds ``[B, S]`` are exchanged the same way.
- Each mini-batch of an epoch's order (:func:`~flowdppo.training.update.minibatch_permutation`) takes
  the same number of samples from every process's share, listed by process, so its ``N`` contiguous
  shares (:meth:`Dist.split`) are each process's own samples. A process back-propagates
  ``loss.sum() / (entries of the whole mini-batch)`` for its share and the gradients are **summed**
  over processes, so the step does not depend on ``N``.
- Per-entry scalars (log-probs, KL, log-ratios) are all-gathered once per optimizer step for the
  metrics, so every process (and rank 0's log) sees whole-batch numbers. Only rank 0 writes files.

Sharding (``train.sharding``):

- ``ddp``: every process holds the whole model; gradients of the trainable parameters are
  all-reduced (summed) in flat buckets before the step. For LoRA runs (a few MB of gradients).
  The module is not wrapped in ``DistributedDataParallel``: adapters call their own submodules
  (``module.transformer``, the text encoder) directly, which a wrapper would hide.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each block of the top-level block lists
  (``transformer_blocks``, ...), then on ``model.module``; children without a trainable parameter (a
  text encoder called outside the module's forward) stay whole. For full fine-tuning of large
  transformers. Every process must run the same forwards, so evaluation is sharded with padding and
  checkpoints gather full tensors (rank 0 keeps them) so they reload in one process.
- ``deepspeed``: DeepSpeed ZeRO-2 (optimizer state and gradients sharded) through accelerate's
  DeepSpeed plugin, i.e. ``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``.

A single process needs none of this: :meth:`Dist.from_env` without ``WORLD_SIZE > 1`` gives a
``Dist`` whose methods are no-ops and whose step is the plain clip-and-step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

log = logging.getLogger("flowdppo")

SHARDINGS = ("ddp", "fsdp2", "deepspeed")
DEFAULT_TIMEOUT_S = 900.0  # train.dist_timeout's default


class DistributedError(RuntimeError):
    """A collective timed out or lost a peer; the message names this rank and the ranks behind it."""


_BUCKET_ELEMS = 1 << 25  # 32 Mi elements per all-reduce of the ddp gradient sync


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return isinstance(t, DTensor)


@dataclass
class Dist:
    """This process's place among ``world`` processes, and the exchanges the trainer needs.

    The default (``Dist()``) is one process: every method is then the identity or the plain local
    operation, so single-process runs pay nothing and need no process group.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    sharding: str = "ddp"
    _engine: Any = None  # the DeepSpeed engine (sharding == "deepspeed")
    _fsdp: bool = False  # fully_shard was applied
    _names: dict = field(default_factory=dict)  # id(sharded parameter) -> its name in model.module
    timeout_s: float = DEFAULT_TIMEOUT_S  # the process group's timeout (train.dist_timeout)
    _seq: int = 0  # collectives this process has entered (published in the store: who is behind)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, model_device: str = "cpu", timeout_s: float | None = None) -> Dist:
        """Join the process group that ``torchrun`` / ``accelerate launch`` describe (``WORLD_SIZE``,
        ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); one process when ``WORLD_SIZE`` is unset or 1.

        The backend is NCCL when the model runs on CUDA (each process then uses ``cuda:LOCAL_RANK``),
        else gloo. A process group that is already initialised (by accelerate, say) is reused.
        ``timeout_s`` (``train.dist_timeout``; else ``FLOWDPPO_DIST_TIMEOUT``, else 900 s) bounds how
        long a collective waits for the other processes: past it the job ends with a
        :class:`DistributedError` that names the rank(s) that stopped arriving.
        """
        import torch.distributed as dist

        from flowdppo.config import check_device_available

        check_device_available(model_device)
        if timeout_s is None:
            timeout_s = float(os.environ.get("FLOWDPPO_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not (dist.is_available() and dist.is_initialized()):
            return cls(timeout_s=timeout_s)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = str(model_device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        d = cls(
            rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device, timeout_s=timeout_s
        )
        log.info("process %d of %d (local rank %d, %s)", d.rank, d.world, local_rank, dist.get_backend())
        return d

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, reports, checkpoints and images."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def model_device(self, requested: str) -> str:
        """The device this process builds the model on: ``cuda`` / ``cuda:k`` becomes ``cuda:LOCAL_RANK``."""
        if self.active and str(requested).startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return str(requested)

    def check_batch(self, rollout_size: int, minibatch_size: int) -> None:
        """The rollout batch and every mini-batch must split evenly over the processes."""
        if rollout_size % self.world or minibatch_size % self.world:
            from flowdppo.config import ConfigError

            raise ConfigError(
                f"with {self.world} processes, prompts_per_iter*group_size ({rollout_size}) and "
                f"train.minibatch_size ({minibatch_size}) must be multiples of {self.world}"
            )

    # ------------------------------------------------------------------ splitting the work

    def share(self, n: int) -> slice:
        """This process's contiguous ``n / world`` of ``n`` items (``n`` a multiple of ``world``)."""
        assert n % self.world == 0, (n, self.world)
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def split(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the index tensor ``idx`` (one mini-batch)."""
        return idx if not self.active else idx[self.share(len(idx))]

    def padded_share(self, n: int) -> tuple[torch.Tensor, int]:
        """This process's contiguous part of ``n`` items, padded to ``ceil(n / world)`` entries (repeating
        the last item) so that every process does the same number of forwards; returns ``(indices, real)``."""
        q = math.ceil(n / self.world)
        start = min(self.rank * q, n)
        real = min(start + q, n) - start
        idx = torch.arange(start, start + real)
        if real < q:
            idx = torch.cat([idx, torch.full((q - real,), n - 1, dtype=torch.long)])
        return idx, real

    def gather_padded(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of :meth:`padded_share`: the ``[q, ...]`` values of every process -> ``[n, ...]`` in order."""
        if not self.active:
            return t[:n]
        q = math.ceil(n / self.world)
        parts = self.all_gather_cat(t).split(q)
        return torch.cat([p[: max(0, min((r + 1) * q, n) - r * q)] for r, p in enumerate(parts)])

    # ------------------------------------------------------------------ collectives

    def _store(self):
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store()
        except Exception:  # noqa: BLE001 - no store (a group built without one): no rank in the message
            return None

    def _call(self, name: str, fn, *args):
        """Run the collective ``fn(*args)``; a timeout or a lost peer becomes a :class:`DistributedError`
        naming the processes that did not reach this collective (from the counters in the store)."""
        self._seq += 1
        store = self._store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(f"flowdppo/seq/{self.rank}", f"{self._seq} {name}")
        try:
            return fn(*args)
        except RuntimeError as e:
            raise DistributedError(self._stall_message(name, e, store)) from e

    def _stall_message(self, name: str, e: BaseException, store) -> str:
        behind = []
        for k in range(self.world):
            if k == self.rank or store is None:
                continue
            try:
                key = f"flowdppo/seq/{k}"
                seq, what = store.get(key).decode().split(" ", 1) if store.check([key]) else ("0", "none")
            except Exception:  # noqa: BLE001 - the store's host is gone too
                continue
            if int(seq) < self._seq:
                behind.append(f"rank {k} (last at collective #{seq}, {what})")
        text = " ".join(str(e).split())
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        cause = f"waited more than {self.timeout_s:g} s" if timed_out else f"failed ({text[:200]})"
        who = (
            f"{', '.join(behind)} did not arrive: stalled or dead"
            if behind
            else "another process stopped or crashed (see its log)"
        )
        return (
            f"rank {self.rank}: collective #{self._seq} ({name}) {cause}; {who}. "
            f"train.dist_timeout={self.timeout_s:g} s sets the limit"
        )

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device).contiguous()

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``t`` (equal shapes) along dim 0, in rank order, on ``t``'s device."""
        if not self.active:
            return t
        import torch.distributed as dist

        src = self._to_comm(t)
        out = [torch.empty_like(src) for _ in range(self.world)]
        self._call("all_gather", dist.all_gather, out, src)
        return torch.cat(out).to(t.device)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes, in place."""
        if self.active:
            import torch.distributed as dist

            buf = self._to_comm(t)
            self._call("all_reduce", dist.all_reduce, buf)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` with rank ``src``'s values."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                buf = self._to_comm(t)
                self._call("broadcast", dist.broadcast, buf, src)
                if buf is not t:
                    t.copy_(buf)

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (a decision that must be the same everywhere)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._call("broadcast_object_list", dist.broadcast_object_list, box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._call("barrier", dist.barrier)

    def all_reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over processes (flat buckets, one all-reduce each).

        A parameter without a gradient is left alone: the graph, hence which parameters get one, is
        the same on every process.
        """
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for g in group + [None]:
                if g is not None and (size + g.numel() <= _BUCKET_ELEMS or not bucket):
                    bucket.append(g)
                    size += g.numel()
                    continue
                if bucket:
                    flat = torch.cat([b.reshape(-1) for b in bucket]).to(self.device)
                    self._call("all_reduce(gradients)", dist.all_reduce, flat)
                    off = 0
                    for b in bucket:
                        b.copy_(flat[off : off + b.numel()].view_as(b))
                        off += b.numel()
                if g is not None:
                    bucket, size = [g], g.numel()

    # ------------------------------------------------------------------ the model and the step

    def prepare(
        self, model, sharding: str = "ddp", optimizer_factory=None, micro_steps: int = 1, grad_clip: float = 1.0
    ):
        """Make ``model`` ready for ``world`` processes and return its optimizer.

        ``optimizer_factory(params)`` builds the optimizer on the (possibly sharded) trainable
        parameters; ``micro_steps`` (backward passes per optimizer step) and ``grad_clip`` matter for
        DeepSpeed only, whose engine owns accumulation and clipping.
        """
        if sharding not in SHARDINGS:
            from flowdppo.config import ConfigError

            raise ConfigError(f"train.sharding {sharding!r} is not valid; valid: {', '.join(SHARDINGS)}")
        self.sharding = sharding
        module: nn.Module = model.module
        trainable = [p for p in model.trainable_parameters() if p.requires_grad]
        if self.active:
            # identical starting weights everywhere (LoRA init draws from each process's RNG)
            self.broadcast_([p.data for p in trainable])
        if self.active and sharding == "fsdp2":
            self._fully_shard(module)
            trainable = [p for p in model.trainable_parameters() if p.requires_grad]
            # names now: after a forward FSDP2 may leave the root's parameters swapped for whole ones
            self._names = {id(p): n for n, p in module.named_parameters()}
        optimizer = optimizer_factory(trainable)
        if self.active and sharding == "deepspeed":
            optimizer = self._deepspeed(module, optimizer, micro_steps, grad_clip)
        return trainable, optimizer

    def _fully_shard(self, module: nn.Module) -> None:
        try:
            from torch.distributed.fsdp import FSDPModule, fully_shard
        except ImportError as e:  # pragma: no cover - torch < 2.6
            raise RuntimeError("train.sharding=fsdp2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world,))
        # children without a trainable parameter (a text encoder, frozen embeddings) stay whole: an adapter may
        # call them outside the module's forward, where FSDP2 would not gather them
        frozen = {n for n, c in module.named_children() if not any(p.requires_grad for p in c.parameters())}
        ignored = {p for n in frozen for p in module.get_submodule(n).parameters()}
        units = 0
        for name, blocks in module.named_modules():
            # top-level block lists (transformer_blocks, single_transformer_blocks, ...): one unit per block
            parts = name.split(".")
            if (
                not isinstance(blocks, nn.ModuleList)
                or not name
                or parts[0] in frozen
                or any(
                    isinstance(module.get_submodule(".".join(parts[:i])), nn.ModuleList) for i in range(1, len(parts))
                )
            ):
                continue
            for blk in blocks:
                if any(True for _ in blk.parameters()):
                    fully_shard(blk, mesh=mesh)
                    units += 1
        try:
            fully_shard(module, mesh=mesh, ignored_params=ignored or None)
        except TypeError as e:  # pragma: no cover - torch < 2.7
            raise RuntimeError("train.sharding=fsdp2 needs torch >= 2.7 (fully_shard(ignored_params=...))") from e
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum over processes, as the ddp path does
                if hasattr(m, "set_force_sum_reduction_for_comms"):  # plain SUM (gloo has no PREMUL_SUM)
                    m.set_force_sum_reduction_for_comms(True)
        self._fsdp = True
        log.info(
            "FSDP2: %s sharded over %d processes as %d blocks + the root; kept whole: %s",
            type(module).__name__,
            self.world,
            units,
            ", ".join(sorted(frozen)) or "nothing",
        )

    def _deepspeed(self, module: nn.Module, optimizer, micro_steps: int, grad_clip: float):
        """DeepSpeed ZeRO-2 through accelerate's plugin (``accelerate launch --config_file ...deepspeed_zero2.yaml``).

        The engine owns gradient accumulation over the ``micro_steps`` backward passes of one
        optimizer step, the clipping and the step; the adapter keeps calling its own submodules
        (ZeRO-2 leaves the parameters whole, so no forward hook is needed).
        """
        try:
            import deepspeed  # noqa: F401
            from accelerate import Accelerator
        except ImportError as e:
            raise RuntimeError(
                "train.sharding=deepspeed needs `pip install deepspeed accelerate` and "
                "`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml`"
            ) from e
        acc = Accelerator()
        plugin = acc.state.deepspeed_plugin
        if plugin is None:
            raise RuntimeError(
                "train.sharding=deepspeed: launch with accelerate and a DeepSpeed config "
                "(configs/accelerate/deepspeed_zero2.yaml)"
            )
        ds = plugin.deepspeed_config
        if int(ds.get("zero_optimization", {}).get("stage", 2)) > 2:
            raise RuntimeError(
                "ZeRO-3 shards the parameters, which the adapters' direct submodule calls bypass; "
                "use ZeRO-2 or train.sharding=fsdp2"
            )
        ds["train_micro_batch_size_per_gpu"] = 1  # bookkeeping only: our micro-batches are sized by the trainer
        ds["gradient_accumulation_steps"] = micro_steps
        ds["train_batch_size"] = micro_steps * self.world
        ds["gradient_clipping"] = grad_clip
        engine, optimizer = acc.prepare(module, optimizer)
        self._engine = engine
        return optimizer

    def zero_grad(self, optimizer) -> None:
        if self._engine is None:
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this process's part of a mini-batch loss (already divided by the whole
        mini-batch's entry count); the exchange happens in :meth:`step`."""
        if self._engine is None:
            loss.backward()
            return
        # ZeRO averages over processes and the engine divides by the accumulation steps: undo both
        self._engine.backward(loss * self.world, scale_wrt_gas=False)
        self._engine.step()  # only the last of the accumulation steps updates

    def step(self, optimizer, params: Sequence[nn.Parameter], grad_clip: float) -> float | torch.Tensor:
        """Sum the gradients over processes, clip their global norm, step; returns the norm before clipping
        (a 0-d tensor where it is one, so that reading it does not wait for the device). The non-finite
        guards read their flags with the step's metrics (:func:`flowdppo.training.update.minibatch_step`)."""
        if self._engine is not None:
            norm = self._engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        if self.active and not self._fsdp:
            self.all_reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        optimizer.step()
        return norm.detach()

    # ------------------------------------------------------------------ checkpoints

    def full_state(self, model, params: Sequence[nn.Parameter]) -> dict[str, torch.Tensor] | None:
        """The trainable weights as full CPU tensors on rank 0 (``None`` elsewhere).

        Under FSDP2 the shards are gathered one tensor at a time (every process must call this) and
        named by their parameter names in ``model.module``, which is what the adapters' own
        ``adapter_state_dict`` uses for full fine-tuning.
        """
        if not self._fsdp:
            return model.adapter_state_dict() if self.is_main else None
        out = {}
        for p in params:
            full = p.detach().full_tensor() if _is_dtensor(p) else p.detach()
            if self.is_main:
                out[self._names[id(p)]] = full.cpu().clone()
        return out if self.is_main else None

    def load_state(self, model, params: Sequence[nn.Parameter], state: dict[str, torch.Tensor]) -> None:
        """Load full trainable weights (every process reads the same file) into the model or its shards."""
        if not self._fsdp:
            model.load_adapter_state_dict(state)
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import distribute_tensor

        for m in model.module.modules():  # no stale whole copies: the next forward gathers the new shards
            if isinstance(m, FSDPModule):
                m.reshard()
        names = self._names
        wanted = {names[id(p)] for p in params}
        if set(state) != wanted:
            raise KeyError(
                f"checkpoint weights do not match the trainable parameters: missing "
                f"{sorted(wanted - set(state))[:5]}, unexpected {sorted(set(state) - wanted)[:5]}"
            )
        with torch.no_grad():
            for p in params:
                full = state[names[id(p)]].to(p.device, p.dtype)
                p.copy_(
                    distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None) if _is_dtensor(p) else full
                )

    def optimizer_state(self, optimizer) -> dict | None:
        """The optimizer's ``state_dict`` with full tensors on rank 0 (``None`` elsewhere); the format of a
        single-process optimizer over the same parameters, so either reloads the other's checkpoint."""
        if self._engine is not None:
            return None  # the engine saves its sharded state itself (see save_engine)
        sd = optimizer.state_dict()
        if not self._fsdp:
            return sd if self.is_main else None
        state = {}
        for i, st in sd["state"].items():  # new dicts: state_dict() shares the live per-parameter ones
            state[i] = {}
            for k, v in st.items():
                full = v.full_tensor() if _is_dtensor(v) else v
                state[i][k] = full.cpu() if self.is_main and torch.is_tensor(full) else full
        return {"state": state, "param_groups": sd["param_groups"]} if self.is_main else None

    def load_optimizer_state(self, optimizer, params: Sequence[nn.Parameter], sd: dict | None) -> None:
        if self._engine is not None or sd is None:
            return
        if self._fsdp:
            from torch.distributed.tensor import distribute_tensor

            order = [p for g in optimizer.param_groups for p in g["params"]]
            state = {}
            for i, st in sd["state"].items():
                p = order[int(i)]
                state[i] = {
                    k: distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                    if _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0
                    else v
                    for k, v in st.items()
                }
            sd = {"state": state, "param_groups": sd["param_groups"]}
        optimizer.load_state_dict(sd)

    def save_engine(self, directory) -> None:
        """DeepSpeed: the engine's own (sharded) optimizer state, written by every process into
        ``directory`` (which rank 0 creates); a no-op otherwise."""
        if self._engine is not None:
            self.barrier()
            self._engine.save_checkpoint(str(directory), tag="deepspeed")

    def load_engine(self, directory) -> None:
        if self._engine is not None and (directory / "deepspeed").exists():
            self._engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False)

    @contextlib.contextmanager
    def full_params(self, module: nn.Module) -> Iterator[None]:
        """Within, ``module``'s parameters are whole on every process (FSDP2 all-gathers them): for
        exporting with the adapter's own ``save_adapter``. A no-op without FSDP2."""
        if not self._fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        with torch.no_grad():
            for m in units:
                m.unshard()
            try:
                yield
            finally:
                for m in reversed(units):
                    m.reshard()


def enable_gradient_checkpointing(model) -> bool:
    """Turn on activation checkpointing for ``model`` (``model.gradient_checkpointing``).

    Uses the adapter's own ``enable_gradient_checkpointing()`` when it has one, else every diffusers
    / transformers submodule of ``model.module`` that supports it. Returns whether anything did;
    a model with nothing to checkpoint logs a warning and trains as before.
    """
    if callable(getattr(model, "enable_gradient_checkpointing", None)):
        model.enable_gradient_checkpointing()
        return True
    done = False
    for m in model.module.modules():
        if getattr(m, "_supports_gradient_checkpointing", False) and callable(
            getattr(m, "enable_gradient_checkpointing", None)
        ):
            m.enable_gradient_checkpointing()
            done = True
    if not done:
        log.warning("model.gradient_checkpointing is set but %s has no module that supports it", type(model).__name__)
    return done


__all__ = ["Dist", "SHARDINGS", "enable_gradient_checkpointing"]

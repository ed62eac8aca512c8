"""Typed, validated configuration: YAML -> dataclasses, presets, ``--set key=value`` overrides.

Every section is a dataclass; :func:`from_dict` rejects an unknown key or a bad value at start with a
message that names it and lists what would be valid. Presets (docs/flow-dppo.md, section "Presets") are plain override
dicts applied before the user's file and ``--set`` values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import yaml

from flowdppo.core.losses import LOSSES
from flowdppo.core.sde import CPS_LOGPROBS, REDUCTIONS, SAMPLERS
from flowdppo.core.steps import STRATEGIES
from flowdppo.registry import Registry, RegistryError

log = logging.getLogger("flowdppo")


class ConfigError(ValueError):
    """A configuration key or value is not valid; the message says which and what is."""


@dataclass
class ModelConfig:
    family: str = "shapes"  # a registered family (flowdppo.models.MODEL_FAMILIES) or "package.module:factory"
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the family's factory
    path: str | None = None  # local diffusers folder or hub id; None = the shipped shapes model
    lora: bool = True  # False = full fine-tuning
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ]
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    # LoRA linears as one matmul with the merged weight W + s B A (flowdppo.models.lora_forward): auto = merged
    # for fp32 weights in one process or under DDP (not under multi-process FSDP2 or DeepSpeed); separate =
    # peft's own x W^T + s (x A^T) B^T; merged = always (refused under multi-process DeepSpeed)
    lora_forward: Literal["auto", "merged", "separate"] = "auto"
    resolution: int = 512  # real models: image side in pixels (the shapes model is 32)
    max_sequence_length: int = 256  # real models: text tokens


@dataclass
class SamplingConfig:
    num_steps: int = 10
    schedule: Literal["diffusers", "uniform-shift", "model"] = "model"  # "model": the family's default
    shift: float = 3.0  # schedule=uniform-shift only (the trainer builds it; "model" = the family's own)
    sampler: str = "flow-sde"  # a registered sampler (flowdppo.core.sde.SAMPLERS) or an import path
    eta: float = 0.7
    guidance_scale: float = 1.0
    same_initial_noise: bool = False  # a group shares its initial noise (DanceGRPO / MixGRPO init_same_noise)
    logprob_reduction: Literal[REDUCTIONS] = "mean"
    cps_logprob: Literal[CPS_LOGPROBS] = "gaussian"
    replay_tolerance: float = 1e-3  # warn when |replay log-prob - rollout log-prob| exceeds this


@dataclass
class StepsConfig:
    strategy: Literal[STRATEGIES] = "random"
    num_sde_steps: int = 3
    start: float = 0.0
    end: float = 0.5
    window_stride: int = 1
    window_every: int = 25


@dataclass
class AlgorithmConfig:
    loss: str = "flow-dppo"  # a registered trust region (flowdppo.core.losses.LOSSES) or an import path
    loss_args: dict[str, Any] = field(default_factory=dict)  # extra knobs for a user's own trust region
    delta: float = 1e-5  # Flow-DPPO KL threshold (mean-reduced KL)
    clip_eps: float = 1e-4  # PPO clip range (Flow-GRPO 1e-4, GRPO-Guard 4e-6)
    loss_adv_clip: float | None = 5.0  # inside the clip losses only: advantages clipped to +-this (Flow-GRPO's 5)
    beta: float = 0.0  # weight of KL to the reference policy
    advantage_std: Literal["global", "group"] = "global"
    norm_adv_clip: float | None = None  # every loss: the normalised advantages clipped to +-this before training
    stat_tracker: bool = False  # per-prompt statistics across iterations
    multi_reward: Literal["sum", "gdpo"] = "sum"


@dataclass
class RewardConfig:
    name: str = "shapes"  # a registered reward (flowdppo.rewards.REWARDS) or "package.module:factory"
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the reward's factory
    # the shapes reward's: all-or-nothing accuracy plus the graded Soft-TIFA atom and prompt scores (no
    # prompt-free term: `quality` could be raised by leaving out an object the prompt asks for)
    weights: dict[str, float] = field(default_factory=lambda: {"strict": 1.0, "tifa_atom": 1.0, "tifa_prompt": 1.0})
    url: str | None = None  # http reward server
    # several rewards at once (flowdppo.rewards.multi): [{name, args, weight | weights, label}, ...];
    # when set, reward.name/args/weights are not used. eval_components: evaluate on these instead.
    components: list[Any] = field(default_factory=list)
    eval_components: list[Any] = field(default_factory=list)


@dataclass
class TrainConfig:
    iterations: int = 280  # `make demo` runs 150 with configs/shapes_demo.yaml (two passes per batch)
    prompts_per_iter: int = 8
    group_size: int = 16
    inner_epochs: int = 1
    minibatch_size: int = 64  # samples per optimizer step
    micro_batch_size: int = 64  # samples per forward/backward
    rollout_batch_size: int = 128  # samples per rollout forward
    lr: float = 3e-4  # the paper's; on the shapes model 1e-3 drifts unless the trust region binds, 1.5e-3 even then
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    world: str | None = "shapes"  # prompt source: a world's name or package.module:object (flowdppo.worlds.world)
    prompt_split: str = "train"  # the world's set to train on
    prompts_file: str | None = None  # one prompt a line (real models); None = the world's prompt_split set
    # relative draw weight of each prompt category of the world's training split (the shapes world's
    # categories: single_object, two_object, counting, colors, position, color_attr); a category not named
    # weighs 1; {} = every training prompt equally likely (the default)
    category_weights: dict[str, float] = field(default_factory=dict)
    log_ref_kl: bool = True  # measure the KL to the reference policy (a diagnostic at beta = 0)
    # iterations between reference-KL measurements at beta = 0, besides the last iteration and those an evaluation
    # follows (beta > 0: every step, from the training forwards); 0 = never
    ref_kl_every: int = 10
    ref_kl_samples: int = 32  # samples of the batch the beta = 0 measurement uses (0 = all)
    # the frozen old policy of each iteration: "replay" re-runs the trained steps without gradient at the
    # current weights (in the first epoch's micro-batches); "rollout" reuses the rollout's own log-probs and
    # means (free; exact when rollout and training forwards are the same computation); "auto" reuses them
    # for fp32 models when a spot check of anchor_check_samples samples agrees, and replays otherwise
    anchor: Literal["replay", "rollout", "auto"] = "auto"
    anchor_check_samples: int = 4  # samples replayed each iteration to check a reused anchor (0 = no check)
    # back-propagate through the rollout's own forwards of the trained steps instead of recomputing them,
    # where the iteration's only optimizer step starts at the rollout's weights (one epoch, one mini-batch,
    # one process, no dropout, a reused anchor): "keep" does so where possible, "auto" only on the CPU (the
    # graphs of every trained step of the whole batch are held from the rollout to the backward: memory,
    # not compute, is what a GPU runs out of), "recompute" never (docs/flow-dppo.md, "One iteration")
    rollout_graph: Literal["auto", "keep", "recompute"] = "auto"
    trajectories_on_cpu: bool = False  # keep stored trajectories on the CPU until trained on
    overlap_reward: bool = True  # score each rollout chunk in a background thread while the next one samples
    # several processes (torchrun / accelerate launch): ddp = replicated weights, summed gradients (LoRA);
    # fsdp2 = fully_shard (full fine-tuning); deepspeed = ZeRO-2 via accelerate. Ignored in one process.
    sharding: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    # several processes: a collective that waits longer than this for another process (a stalled or dead
    # rank) ends the job with an error naming the rank, instead of hanging
    dist_timeout: float = 900.0


@dataclass
class EvalConfig:
    every: int = 40  # iterations; 0 = only before and after training
    num_prompts: int = 96  # per set
    samples_per_prompt: int = 4  # fixed-noise samples of each evaluation prompt
    sets: list[str] = field(default_factory=lambda: ["eval", "ood"])  # the world's evaluation sets
    grid_prompts: int = 8  # image grids before/after
    prompts_file: str | None = None  # real models: evaluation prompts (scored by the training reward)
    seed: int = 1234  # evaluation noise: the same images before and after training
    ratio_noise_every: int = 20  # iterations between live ratio-noise measurements (0 = never)
    ratio_noise_samples: int = 32


@dataclass
class LogConfig:
    run_dir: str = "runs"
    name: str = "flowdppo"
    tensorboard: bool = True
    checkpoint_every: int = 10
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    steps: StepsConfig = field(default_factory=StepsConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Presets (docs/flow-dppo.md, section "Presets")
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "flow-dppo": {"sampling": {"sampler": "flow-sde", "eta": 0.7}, "algorithm": {"loss": "flow-dppo", "delta": 1e-5}},
    "flow-dppo-cps": {"sampling": {"sampler": "cps", "eta": 0.8}, "algorithm": {"loss": "flow-dppo", "delta": 1e-5}},
    "flow-grpo": {"sampling": {"sampler": "flow-sde", "eta": 0.7}, "algorithm": {"loss": "clip", "clip_eps": 1e-4}},
    "flow-cps": {"sampling": {"sampler": "cps", "eta": 0.8}, "algorithm": {"loss": "clip", "clip_eps": 1e-4}},
    "grpo-guard": {
        "sampling": {"sampler": "flow-sde", "eta": 0.7},
        "algorithm": {"loss": "grpo-guard", "clip_eps": 4e-6},
    },
}


# --------------------------------------------------------------------------------------------
# dict -> dataclass with validation
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not valid; valid: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())
        ):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


# keys renamed since earlier releases: old config files (and old runs' config.yaml) still load
RENAMED = {"algorithm.adv_clip": "algorithm.loss_adv_clip", "algorithm.advantage_clip": "algorithm.norm_adv_clip"}


def _build(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the config'}: expected a mapping (a section of keys), got {data!r}")
    data = dict(data or {})
    for old, new in RENAMED.items():
        section, old_key = old.split(".")
        if where == section and old_key in data:
            new_key = new.split(".")[1]
            if new_key in data:
                raise ConfigError(f"{old} was renamed to {new}; give only {new}")
            log.warning("%s was renamed to %s; reading it as %s", old, new, new)
            data[new_key] = data.pop(old_key)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {(where + '.') if where else ''}{unknown[0]}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.lora=false"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem})") from None
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item}: the key must be section.name, e.g. train.lr=1e-4")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[: i + 1])} was already set to a value")
        node[parts[-1]] = value
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# key -> (check, what is valid); None values pass where the field is optional
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "train.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "train.adam_eps": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "train.adam_betas": (
        lambda v: len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    "train.grad_clip": (lambda v: _finite(v) and v > 0, "a finite number > 0 (the max gradient norm)"),
    "train.seed": (lambda v: 0 <= v < 2**63, "an integer >= 0"),
    "sampling.eta": (lambda v: _finite(v) and v > 0, "a finite number > 0 (RL needs stochastic steps)"),
    "sampling.guidance_scale": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (1 = no guidance)"),
    "sampling.shift": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "sampling.replay_tolerance": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "steps.start": (lambda v: _finite(v) and 0 <= v <= 1, "a fraction of the trajectory in [0, 1]"),
    "steps.end": (lambda v: _finite(v) and 0 <= v <= 1, "a fraction of the trajectory in [0, 1]"),
    "steps.num_sde_steps": (lambda v: v >= 1, "an integer >= 1"),
    "steps.window_stride": (lambda v: v >= 1, "an integer >= 1"),
    "steps.window_every": (lambda v: v >= 1, "an integer >= 1 (iterations between window moves)"),
    "algorithm.delta": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (the KL threshold)"),
    "algorithm.clip_eps": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "algorithm.loss_adv_clip": (lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0, or null (off)"),
    "algorithm.norm_adv_clip": (lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0, or null (off)"),
    "algorithm.beta": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "reward.weights": (
        lambda v: all(_finite(w) for w in v.values()) and any(w != 0 for w in v.values()),
        "finite weights, at least one non-zero",
    ),
    "model.lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "model.lora_alpha": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "model.lora_targets": (
        lambda v: len(v) > 0 and all(isinstance(x, str) and x.strip() for x in v),
        "a non-empty list of module names, e.g. [to_q, to_k, to_v, to_out.0]",
    ),
    "model.resolution": (lambda v: v >= 8, "an integer >= 8 (pixels)"),
    "model.max_sequence_length": (lambda v: v >= 1, "an integer >= 1"),
    "eval.every": (lambda v: v >= 0, "an integer >= 0 (0 = only before and after training)"),
    "eval.num_prompts": (lambda v: v >= 1, "an integer >= 1"),
    "eval.grid_prompts": (lambda v: v >= 0, "an integer >= 0"),
    "eval.seed": (lambda v: 0 <= v < 2**63, "an integer >= 0"),
    "eval.ratio_noise_every": (lambda v: v >= 0, "an integer >= 0 (0 = never)"),
    "eval.ratio_noise_samples": (lambda v: v >= 1, "an integer >= 1"),
    "log.checkpoint_every": (lambda v: v >= 0, "an integer >= 0 (0 = only at the end and on interruption)"),
    "train.dist_timeout": (lambda v: _finite(v) and v > 0, "a finite number of seconds > 0"),
}


def _check_values(cfg: Config) -> None:
    """Every numeric value finite and in range (message: the key, the value, what is valid)."""
    for key, (ok, valid) in _RANGES.items():
        section, name = key.split(".")
        if not hasattr(getattr(cfg, section), name):
            continue
        value = _get_key(cfg, key)
        if key.startswith("steps.window") and cfg.steps.strategy != "window":
            continue
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not valid; valid: {valid}")
    for cat, w in cfg.train.category_weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not _finite(w) or w < 0:
            raise ConfigError(f"train.category_weights.{cat}={w!r} is not valid; valid: a finite number >= 0")
    if cfg.steps.start >= cfg.steps.end:
        raise ConfigError(f"steps.start ({cfg.steps.start}) must be < steps.end ({cfg.steps.end})")
    _check_device(cfg.model)
    m = cfg.model
    if m.path and m.family == "shapes" and not os.path.isdir(m.path):
        raise ConfigError(
            f"model.path={m.path!r} is not a folder; valid: a shapes model folder (flowdppo pretrain --out)"
        )
    if m.path and m.family != "shapes" and not os.path.exists(m.path) and not _looks_like_hub_id(m.path):
        raise ConfigError(
            f"model.path={m.path!r} does not exist; valid: a local diffusers folder or a hub id like org/name"
        )
    if cfg.train.group_size == 1 and not cfg.algorithm.stat_tracker:
        log.warning(
            "train.group_size=1: every group holds one sample, so every advantage is 0 and the run cannot learn; "
            "use train.group_size >= 2 (or algorithm.stat_tracker=true)"
        )


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and "\\" not in path


def _check_device(m: ModelConfig) -> None:
    """``model.device`` parses; half precision only where it computes (availability: :func:`check_device_available`)."""
    import torch

    try:
        dev = torch.device(m.device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"model.device={m.device!r} is not a device; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cpu" and m.dtype == "float16":
        raise ConfigError(
            "model.dtype='float16' is not valid on model.device=cpu (CPU half precision overflows to NaN); "
            "valid: float32, bfloat16"
        )


def check_device_available(device: str) -> None:
    """The device ``model.device`` names exists on this machine (checked where the model is built, so
    a GPU config still loads on a laptop)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but torch sees no CUDA GPU on this machine; valid: cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"model.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            f"valid: cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"model.device={device!r} but MPS is not available; valid: cpu")


def validate(cfg: Config) -> Config:
    """Cross-field checks that a single field's type cannot express."""
    _check_values(cfg)
    t, s = cfg.train, cfg.sampling
    positive = {
        "train.iterations": t.iterations,
        "train.prompts_per_iter": t.prompts_per_iter,
        "train.group_size": t.group_size,
        "train.inner_epochs": t.inner_epochs,
        "train.minibatch_size": t.minibatch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.rollout_batch_size": t.rollout_batch_size,
        "sampling.num_steps": s.num_steps,
        "eval.samples_per_prompt": cfg.eval.samples_per_prompt,
    }
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"{k} must be >= 1, got {v}")
    non_negative = {
        "train.ref_kl_every": t.ref_kl_every,
        "train.ref_kl_samples": t.ref_kl_samples,
        "train.anchor_check_samples": t.anchor_check_samples,
    }
    for k, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{k} must be >= 0, got {v}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if s.eta < 0:
        raise ConfigError(f"sampling.eta must be >= 0, got {s.eta}")
    if s.sampler == "cps" and s.eta > 1:
        raise ConfigError(f"sampling.eta for the cps sampler must be in [0, 1], got {s.eta}")
    if s.sampler == "ode" or s.eta == 0:
        raise ConfigError("RL needs stochastic steps: sampling.sampler must not be 'ode' and sampling.eta must be > 0")
    if t.micro_batch_size > t.minibatch_size:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) must be <= train.minibatch_size ({t.minibatch_size})"
        )
    if t.minibatch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.minibatch_size ({t.minibatch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    total = t.prompts_per_iter * t.group_size
    if total % t.minibatch_size:
        raise ConfigError(
            f"the rollout batch prompts_per_iter*group_size = {total} must be a multiple of "
            f"train.minibatch_size ({t.minibatch_size})"
        )
    _check_registries(cfg)
    if cfg.algorithm.delta < 0 or cfg.algorithm.clip_eps <= 0 or cfg.algorithm.beta < 0:
        raise ConfigError("algorithm.delta and algorithm.beta must be >= 0, algorithm.clip_eps > 0")
    if not cfg.reward.weights:
        raise ConfigError("reward.weights must name at least one reward component")
    _check_reward_components(cfg)
    if cfg.reward.name == "http" and not (cfg.reward.url or cfg.reward.args.get("url")):
        raise ConfigError("reward.name=http needs reward.url")
    if cfg.model.lora and cfg.model.lora_rank < 1:
        raise ConfigError(f"model.lora_rank must be >= 1, got {cfg.model.lora_rank}")
    # the step window must hold enough steps
    from flowdppo.core.steps import StepSelection

    try:
        sel = StepSelection(**asdict(cfg.steps))
        pool = sel.pool(s.num_steps)
        if sel.strategy != "fraction" and sel.num_sde_steps > len(pool):
            raise ValueError(f"steps.num_sde_steps={sel.num_sde_steps} exceeds the {len(pool)} steps in the window")
    except ValueError as e:
        raise ConfigError(f"steps: {e}") from None
    _warn_ignored(cfg)
    return cfg


def _check_reward_components(cfg: Config) -> None:
    from flowdppo.rewards import REWARDS
    from flowdppo.rewards.multi import parse_components

    for key in ("components", "eval_components"):
        try:
            comps = parse_components(getattr(cfg.reward, key), f"reward.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for i, c in enumerate(comps):
            try:
                REWARDS.get(c.name)  # a registered name or an import path that resolves
            except RegistryError as e:
                raise ConfigError(f"reward.{key}[{i}].name: {str(e).split(': ', 1)[-1]}") from None
    if cfg.reward.components and cfg.reward.weights != RewardConfig().weights:
        log.warning("reward.weights is ignored with reward.components (give each component a weight)")


def _registries() -> list[tuple[Registry, str]]:
    """Each registry with the config value that selects from it."""
    from flowdppo.models import MODEL_FAMILIES
    from flowdppo.rewards import REWARDS
    from flowdppo.worlds import WORLDS

    return [
        (MODEL_FAMILIES, "model.family"),
        (SAMPLERS, "sampling.sampler"),
        (LOSSES, "algorithm.loss"),
        (REWARDS, "reward.name"),
        (WORLDS, "train.world"),
    ]


def _get_key(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_registries(cfg: Config) -> None:
    """Every registry-selected value names a registered entry or an import path that resolves."""
    for registry, key in _registries():
        value = _get_key(cfg, key)
        if value is None or value in registry:  # None: train.world=null (prompts from files)
            continue  # built-in: not imported here (model families import their libraries lazily)
        try:
            registry.get(value)
        except RegistryError as e:
            raise ConfigError(str(e)) from None
    if cfg.train.inner_epochs > 1 and not LOSSES.get(cfg.algorithm.loss).multi_update:
        raise ConfigError(
            f"algorithm.loss={cfg.algorithm.loss} declares it is not safe for several optimizer steps per batch; "
            f"train.inner_epochs must be 1, got {cfg.train.inner_epochs}"
        )


def check_reward_components(cfg: Config) -> None:
    """``reward.weights`` names only components the configured reward declares (its factory's
    ``components`` attribute); called where the reward is built from the config (a reward that
    declares none is checked at the first rollout)."""
    from flowdppo.rewards import REWARDS

    try:
        declared = getattr(REWARDS.get(cfg.reward.name), "components", None)
    except RegistryError:
        return
    if declared:
        missing = [k for k in cfg.reward.weights if k not in declared]
        if missing:
            raise ConfigError(
                f"reward.weights names {missing[0]!r}, which reward {cfg.reward.name!r} does not return; "
                f"valid: {', '.join(declared)}"
            )


def one_step_per_iteration(t: TrainConfig) -> bool:
    """One optimizer step per iteration: one epoch over the batch in a single mini-batch (so the step runs
    at the rollout's weights; ``train.rollout_graph`` needs it)."""
    return t.inner_epochs == 1 and t.minibatch_size == t.prompts_per_iter * t.group_size


def _warn_ignored(cfg: Config) -> list[str]:
    """Warn about knobs set away from their default that the chosen setting never reads."""
    warnings: list[str] = []
    a, s = cfg.algorithm, cfg.sampling
    defaults_a, defaults_s = AlgorithmConfig(), SamplingConfig()
    uses = LOSSES.get(a.loss).uses
    for knob in ("delta", "clip_eps", "loss_adv_clip"):
        if getattr(a, knob) != getattr(defaults_a, knob) and knob not in uses:
            warnings.append(
                f"algorithm.{knob}={getattr(a, knob)} is ignored by algorithm.loss={a.loss} "
                f"(it reads: {', '.join(uses) or 'none of delta, clip_eps, loss_adv_clip'})"
            )
    if s.shift != defaults_s.shift and s.schedule != "uniform-shift":
        warnings.append(
            f"sampling.shift={s.shift} is ignored with sampling.schedule={s.schedule} (only uniform-shift reads it)"
        )
    if s.cps_logprob != defaults_s.cps_logprob and "cps_logprob" not in SAMPLERS.get(s.sampler).options:
        warnings.append(f"sampling.cps_logprob={s.cps_logprob} is ignored by sampling.sampler={s.sampler}")
    t, defaults_t = cfg.train, TrainConfig()
    if t.anchor == "replay" and t.anchor_check_samples != defaults_t.anchor_check_samples:
        warnings.append("train.anchor_check_samples is ignored with train.anchor=replay (nothing is reused)")
    if t.rollout_graph == "keep" and not one_step_per_iteration(t):
        warnings.append(
            "train.rollout_graph=keep is ignored: it needs one optimizer step per iteration "
            f"(train.inner_epochs=1 and train.minibatch_size = prompts_per_iter x group_size = "
            f"{t.prompts_per_iter * t.group_size}), got inner_epochs={t.inner_epochs}, "
            f"minibatch_size={t.minibatch_size}"
        )
    if a.beta > 0:
        for knob in ("ref_kl_every", "ref_kl_samples"):
            if getattr(t, knob) != getattr(defaults_t, knob):
                warnings.append(
                    f"train.{knob} is ignored with algorithm.beta > 0 (training computes the reference KL every step)"
                )
    if cfg.reward.url and cfg.reward.name != "http":
        warnings.append(f"reward.url is ignored by reward.name={cfg.reward.name} (only the http reward reads it)")
    for w in warnings:
        log.warning(w)
    return warnings


def from_dict(data: Mapping[str, Any] | None) -> Config:
    cfg = _build(Config, data or {}, "")
    return validate(cfg)


def read_yaml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing, unreadable, binary or malformed file is a one-line
    :class:`ConfigError` that names the path."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not a text file ({e.reason} at byte {e.start}); expected YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{what} {path} is not valid YAML{at}: {problem}") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {path} must be a YAML mapping (sections model, train, ...); got {type(data).__name__}"
        )
    return data


def load_config(path: str | None = None, preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset, then the YAML file, then ``--set`` overrides, validated."""
    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if path:
        file_data = read_yaml(path)
    set_data = parse_set(overrides or [])
    preset = preset or set_data.pop("preset", None) or file_data.get("preset") or "flow-dppo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    data = _deep_merge(PRESETS[preset], file_data)
    data = _deep_merge(data, set_data)
    data["preset"] = preset
    return from_dict(data)


def load_run_config(run_dir: str, overrides: list[str] | None = None) -> Config:
    """A run's resolved ``config.yaml`` with ``--set`` overrides (for ``--resume``), validated."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir} is not a flowdppo run directory (no config.yaml)")
    data = read_yaml(path, "run config")
    return from_dict(_deep_merge(data, parse_set(overrides or [])))

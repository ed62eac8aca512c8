"""What the diffusers model families (SD3 / SD3.5, FLUX.1) share: loading, LoRA or full fine-tuning,
mixed precision, the prompt cache, the schedule, VAE decoding and the LoRA export.

A family adapter subclasses :class:`DiffusersFlowModel` and supplies four things: the pipeline class,
how a batch of prompts is encoded (``_encode_batch``), the transformer call (``velocity``), and the
latent geometry (``latent_shape`` and the ``mu`` of the dynamic shift). Everything else lives here once.

Precision
---------
``cfg.dtype`` is the compute dtype of the frozen networks (text encoders, VAE, transformer base weights).
LoRA weights are always float32 (peft casts the layer input to the LoRA dtype and the result back), so
the optimizer updates fp32 master weights. Full fine-tuning keeps the transformer in fp32 and runs it
under ``torch.autocast(cfg.dtype)`` when that is a half type. :meth:`velocity` always returns fp32 and
the latents stay fp32 between steps (the transition maths lives in :mod:`flowdppo.core.sde`).

Reference policy
----------------
LoRA: :meth:`disable_adapter` switches every peft layer to its base layer (``peft_adapter_disabled``),
so the reference is the pretrained model bit for bit with no second copy of the weights. Full
fine-tuning: a frozen copy of the transformer at load time (twice the transformer's memory).

Export
------
:meth:`save_adapter` writes ``pytorch_lora_weights.safetensors`` through the pipeline class's own
``save_lora_weights`` (keys ``transformer.<module>.lora_A/lora_B.weight`` from peft's
``get_peft_model_state_dict``), so ``pipe.load_lora_weights(dir)`` on a stock pipeline loads it. The
LoRA scale ``alpha / r`` is folded into ``lora_B`` and the stored adapter config says ``lora_alpha = r``:
every loader then applies the same update whether or not it reads the adapter metadata. Full
fine-tuning writes ``transformer/`` with ``save_pretrained``. ``flowdppo_adapter.json`` records what
was trained (family, base model, rank, alpha, targets).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowdppo.core import sde
from flowdppo.models.base import AdapterMixin, Cond, torch_dtype

log = logging.getLogger("flowdppo")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_INFO_NAME = "flowdppo_adapter.json"
FULL_TRANSFORMER_DIR = "transformer"
ENCODE_BATCH = 16  # prompts per text-encoder call
DECODE_BATCH = 8  # latents per VAE call


def load_pipeline(pipeline_cls: type, path: str | None, dtype: torch.dtype, family: str):
    """``pipeline_cls.from_pretrained(path)`` with a message that says what ``path`` must be."""
    if not path:
        raise ValueError(
            f"model.family={family} needs model.path: a local diffusers folder or a hub id "
            f"(e.g. --set model.path=stabilityai/stable-diffusion-3.5-medium)"
        )
    try:
        return pipeline_cls.from_pretrained(path, **_dtype_kwarg(dtype))
    except OSError as e:
        local = Path(path).exists()
        hint = (
            "the folder exists but is not a diffusers pipeline of this family (no model_index.json?)"
            if local
            else "not a local folder; as a hub id it needs network access or the hub cache (HF_HOME)"
        )
        raise FileNotFoundError(f"cannot load a {pipeline_cls.__name__} from {path!r}: {hint}. ({e})") from e


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for diffusers versions that renamed ``torch_dtype`` (it warns otherwise)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

        return {"dtype": dtype}
    except ImportError:
        return {"torch_dtype": dtype}


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``; cast it only if it was not loaded in ``dtype`` (a cast would undo
    the modules a diffusers model keeps in fp32)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if dtypes and dtype not in dtypes:
        module.to(device, dtype)
    else:
        module.to(device)


class DiffusersFlowModel(AdapterMixin):
    """A diffusers text-to-image flow model behind :class:`flowdppo.models.base.FlowModel`.

    ``module`` is the transformer (the only network that trains); text encoders and VAE are frozen
    and reached through ``pipe``.
    """

    family: str = "diffusers"
    pipeline_cls_name: str = ""

    def __init__(self, pipe: Any, cfg: Any):
        self.pipe = pipe
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = torch_dtype(cfg.dtype)
        self.base_path = cfg.path
        self.max_sequence_length = int(cfg.max_sequence_length)
        self.transformer: nn.Module = pipe.transformer
        self.module: nn.Module = self.transformer
        self.vae = pipe.vae
        self.scheduler_config: dict[str, Any] = {
            k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")
        }
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            log.warning(
                "%s: the pipeline's scheduler is %s; the 'diffusers' schedule reproduces "
                "FlowMatchEulerDiscreteScheduler",
                self.family,
                type(pipe.scheduler).__name__,
            )
        self.lora_config: dict[str, Any] | None = None
        self._reference: nn.Module | None = None
        self._use_reference = False
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._autocast = False

        # frozen parts: text encoders, VAE (already in cfg.dtype from from_pretrained, fp32-kept modules
        # included; only moved here)
        for name in self._text_encoder_names():
            enc = getattr(pipe, name, None)
            if enc is not None:
                _place(enc.requires_grad_(False).eval(), self.device, self.dtype)
        if self.vae is not None:
            _place(self.vae.requires_grad_(False).eval(), self.device, self.dtype)
        _place(self.transformer.requires_grad_(False), self.device, self.dtype)

        if cfg.lora:
            self.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        else:
            self.enable_full_finetune()
        self.latent_shape: tuple[int, int, int] = self._latent_shape(int(cfg.resolution))

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' per-block activation checkpointing on the transformer (what trains)."""
        self.transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ family hooks
    def _text_encoder_names(self) -> Sequence[str]:
        return ("text_encoder", "text_encoder_2", "text_encoder_3")

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def _encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{name: [len(prompts), ...]}`` for one batch of prompts, with the pipeline's own encoders."""
        raise NotImplementedError

    def _mu(self, num_steps: int) -> float | None:
        """``mu`` of the dynamic shift for this resolution (None when the scheduler has none)."""
        return None

    def _base_sigmas(self, num_steps: int) -> Any:
        """Sigmas the pipeline passes to ``set_timesteps`` (None: the scheduler's own linspace)."""
        return None

    # ------------------------------------------------------------------ adapters
    def add_lora(self, rank: int = 32, alpha: float = 64.0, targets: Sequence[str] | None = None) -> None:
        """A peft LoRA adapter (``B = 0``: the model is unchanged) on the transformer; fp32 LoRA weights."""
        from peft import LoraConfig

        if self.lora_config is not None or self._reference is not None:
            raise RuntimeError("the model already has an adapter or is set up for full fine-tuning")
        targets = list(targets or ("to_q", "to_k", "to_v", "to_out.0"))
        self.transformer.add_adapter(
            LoraConfig(
                r=int(rank), lora_alpha=float(alpha), target_modules=targets, init_lora_weights=True, lora_dropout=0.0
            )
        )
        n = 0
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
                n += 1
            else:
                p.requires_grad_(False)
        if n == 0:
            raise ValueError(f"model.lora_targets {targets} matched no module of the {self.family} transformer")
        self.lora_config = {"rank": int(rank), "alpha": float(alpha), "target_modules": targets}

    def enable_full_finetune(self) -> None:
        """Train every transformer weight (fp32 master weights, autocast to ``cfg.dtype``); keep a frozen
        copy as the reference policy."""
        if self.lora_config is not None:
            raise RuntimeError("full fine-tuning and a LoRA adapter are exclusive")
        # fresh fp32 storage for every weight: the trainable copy and the reference copy then have the same
        # memory alignment, so the reference reproduces the untrained model bit for bit (CPU matmul kernels
        # can round differently for differently aligned operands, e.g. safetensors-mapped weights)
        with torch.no_grad():
            for t in list(self.transformer.parameters()) + list(self.transformer.buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(torch.float32, copy=True)
        self._autocast = self.dtype != torch.float32
        self._reference = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.transformer.requires_grad_(True)

    def _lora_root(self) -> nn.Module:
        return self.transformer

    def _trained_net(self) -> nn.Module:
        return self.transformer

    def _compute_ctx(self) -> contextlib.AbstractContextManager:
        if self._autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    @property
    def _input_dtype(self) -> torch.dtype:
        """Dtype of the transformer's inputs (the pipeline's latent dtype)."""
        return torch.float32 if self._autocast else self.dtype

    def _trainable_named(self) -> dict[str, nn.Parameter]:
        if self.lora_config is not None:
            return {n: p for n, p in self.transformer.named_parameters() if "lora_" in n}
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def lora_export_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(state, adapter_config)`` in diffusers' transformer LoRA layout, ``alpha / r`` folded into ``lora_B``."""
        from peft import get_peft_model_state_dict

        if self.lora_config is None:
            raise RuntimeError("the model has no LoRA adapter")
        scale = self.lora_config["alpha"] / self.lora_config["rank"]
        state = {}
        for k, v in get_peft_model_state_dict(self.transformer, adapter_name="default").items():
            v = v.detach().to("cpu", torch.float32)
            state[k] = (v * scale if ".lora_B." in k else v).contiguous()
        peft_cfg = self.transformer.peft_config["default"].to_dict()
        peft_cfg["lora_alpha"] = peft_cfg["r"]  # the scale lives in lora_B now
        peft_cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_cfg.items()}
        return state, peft_cfg

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``; full
        fine-tuning: ``transformer/`` (``save_pretrained``). Both with ``flowdppo_adapter.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {
            "format": "flowdppo-diffusers-adapter",
            "family": self.family,
            "pipeline": self.pipeline_cls_name,
            "base_model": self.base_path,
            "resolution": int(self.cfg.resolution),
            "max_sequence_length": self.max_sequence_length,
        }
        if self.lora_config is not None:
            state, peft_cfg = self.lora_export_state_dict()
            self._pipeline_cls().save_lora_weights(
                str(d), transformer_lora_layers=state, transformer_lora_adapter_metadata=peft_cfg
            )
            info.update(
                kind="lora",
                weights=LORA_WEIGHT_NAME,
                lora=self.lora_config,
                note="alpha/r folded into lora_B; the stored adapter config has lora_alpha = r",
            )
        else:
            self.transformer.save_pretrained(str(d / FULL_TRANSFORMER_DIR))
            info.update(kind="full", weights=FULL_TRANSFORMER_DIR)
        (d / ADAPTER_INFO_NAME).write_text(json.dumps(info, indent=1))

    def _pipeline_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_cls_name)

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float = 1.0) -> Cond:
        """Conditioning ``[len(prompts), ...]`` on :attr:`device`; each unique prompt is encoded once
        (cached on the CPU). With true CFG (SD3, scale > 1) the negative (empty) prompt's tensors are
        added under ``negative_*`` keys."""
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        with torch.no_grad():
            for i in range(0, len(missing), ENCODE_BATCH):
                chunk = missing[i : i + ENCODE_BATCH]
                enc = self._encode_batch(chunk)
                for j, p in enumerate(chunk):
                    self._prompt_cache[p] = {k: v[j : j + 1].detach().to("cpu") for k, v in enc.items()}
        tensors = (
            {
                k: torch.cat([self._prompt_cache[p][k] for p in prompts]).to(self.device)
                for k in self._prompt_cache[prompts[0]]
            }
            if prompts
            else {}
        )
        if self.uses_true_cfg(guidance_scale) and prompts:
            neg = self.encode_prompts([""], 1.0)
            for k, v in neg.tensors.items():
                tensors["negative_" + k] = v.expand(len(prompts), *v.shape[1:]).clone()
        return Cond(tensors)

    def uses_true_cfg(self, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` means a second (unconditional) transformer pass."""
        return False

    # ------------------------------------------------------------------ schedule and decoding
    def sigmas(self, num_steps: int, schedule: str = "model", shift: float | None = None) -> torch.Tensor:
        """``[num_steps + 1]`` fp32, 1 -> 0: exactly the pipeline's own schedule (``"model"`` or
        ``"diffusers"``; dynamic shift with ``mu`` from the resolution included). ``uniform-shift`` never
        reaches a model: :func:`flowdppo.training.rollout.sampling_schedule` builds it."""
        if schedule in ("model", "diffusers"):
            return sde.diffusers_sigmas(
                num_steps, self.scheduler_config, mu=self._mu(num_steps), base_sigmas=self._base_sigmas(num_steps)
            )
        raise ValueError(f"unknown schedule {schedule!r}; valid: model, diffusers")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` fp32: ``vae.decode`` of :meth:`_vae_latents` then the
        pipeline's ``x * 0.5 + 0.5`` clamp, in chunks of ``DECODE_BATCH``."""
        if self.vae is None:
            raise RuntimeError(f"this {self.family} model was built without a VAE: it cannot decode")
        out = []
        with torch.no_grad():
            for chunk in x.split(DECODE_BATCH):
                lat = self._vae_latents(chunk.to(self.device).float()).to(self.vae.dtype)
                img = self.vae.decode(lat, return_dict=False)[0]
                out.append((img.float() * 0.5 + 0.5).clamp(0, 1))
        return torch.cat(out) if out else x.new_zeros((0, 3, 0, 0))

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Our latents (fp32) -> what ``vae.decode`` takes: ``x / scaling_factor + shift_factor``."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return x / self.vae.config.scaling_factor + shift

    # ------------------------------------------------------------------ helpers
    def _check_latents(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents must be [B, {', '.join(map(str, self.latent_shape))}] for "
                f"model.resolution={self.cfg.resolution}, got {tuple(x.shape)}"
            )

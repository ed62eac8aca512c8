"""The one small protocol every model family implements.

The trainer, the rollout and the replay only ever talk to a model through this protocol, so adding
a model family (the embedded shapes model, SD3, FLUX) is one adapter and never a copy of the
trainer.

Conventions
-----------
- Latents are ``[B, C, H, W]`` tensors in the *unpacked* layout; an adapter whose transformer wants
  packed tokens (FLUX) packs and unpacks inside :meth:`FlowModel.velocity`.
- ``sigma`` is the flow time in ``[0, 1]`` (1 = noise, 0 = data); adapters call their network with
  ``timestep = 1000 * sigma`` (docs/flow-dppo.md, section "The MDP").
- :meth:`FlowModel.velocity` returns float32 whatever the network's dtype: the transition maths is
  done in fp32 by :mod:`flowdppo.core.sde`.
- Conditioning is a :class:`Cond`: a dict of tensors that all share the leading batch dimension,
  so the trainer can index, repeat and concatenate it without knowing what is inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class Cond:
    """Prompt conditioning: tensors that all have the batch as their first dimension ``[B, ...]``."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Cond tensors disagree on the batch size: {sizes}")

    @property
    def batch_size(self) -> int:
        for v in self.tensors.values():
            return int(v.shape[0])
        return 0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def index(self, idx: torch.Tensor | slice | Sequence[int]) -> Cond:
        """Rows ``idx`` of every tensor."""
        if not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def repeat_interleave(self, n: int) -> Cond:
        """Each row repeated ``n`` times in place (prompt -> its group of ``n`` samples)."""
        return Cond({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return Cond(out)

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        if not conds:
            return Cond()
        keys = conds[0].tensors.keys()
        for c in conds:
            if c.tensors.keys() != keys:
                raise ValueError("cannot concatenate Cond objects with different keys")
        return Cond({k: torch.cat([c.tensors[k] for c in conds], dim=0) for k in keys})


@runtime_checkable
class FlowModel(Protocol):
    """What the trainer needs from a model family.

    Attributes
    ----------
    module:
        The ``nn.Module`` holding every parameter (base + adapter); the trainer puts it in train or
        eval mode, wraps it for distributed training and saves its adapter.
    latent_shape:
        ``(C, H, W)`` of the latents the kernels act on.
    device, dtype:
        Where the network runs and its compute dtype (latents and the transition maths stay fp32).
    """

    module: nn.Module
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float = 1.0) -> Cond:
        """Text conditioning for ``len(prompts)`` prompts (with what CFG needs when scale > 1)."""
        ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity ``v(x, sigma)`` as float32 ``[B, C, H, W]``; ``x`` is ``[B, C, H, W]``, ``sigma`` is ``[B]``.

        Guidance is applied as the model's own pipeline does (true CFG for SD3, a guidance embedding
        for distilled FLUX). ``guidance_scale == 1`` means no guidance.
        """
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H', W']`` in ``[0, 1]`` (float32) from final latents ``[B, C, H, W]``."""
        ...

    def sigmas(self, num_steps: int, schedule: str) -> torch.Tensor:
        """The family's ``[num_steps + 1]`` sigma schedule (``"model"`` or ``"diffusers"``), fp32, 1 -> 0."""
        ...

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """Context in which :meth:`velocity` is the pretrained (reference) model."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (the LoRA adapter, or every weight for full fine-tuning)."""
        ...

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only, for checkpoints."""
        ...

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_adapter(self, directory: str) -> None:
        """Export the trained weights in the model family's own loadable format."""
        ...


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the one dtype table: ``model.dtype``, ``--dtype``)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + g (v_c - v_u)`` (every adapter combines in fp32 through this)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@contextlib.contextmanager
def peft_adapter_disabled(module: nn.Module) -> Iterator[None]:
    """Disable every peft LoRA layer of ``module`` (works for diffusers models with ``add_adapter``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled in zip(layers, previous):
            m.enable_adapters(not was_disabled)


class AdapterMixin:
    """What the adapters share: the trained weights (named by :meth:`_trainable_named`) and
    ``disable_adapter``. The reference (pretrained) policy is the same network
    with its peft LoRA disabled when ``lora_config`` is set, else a frozen copy (``_reference``) kept for
    full fine-tuning. Subclasses set ``lora_config``, ``_reference``, ``_use_reference`` and name the
    module holding the LoRA layers in :meth:`_lora_root`; their forward uses :meth:`_active` to pick
    the trained network or the reference copy.
    """

    lora_config: dict | None
    _reference: nn.Module | None
    _use_reference: bool

    def _lora_root(self) -> nn.Module:
        raise NotImplementedError

    def _trainable_named(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable_named().values())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable weights (names relative to the trained module)."""
        return {n: p.detach().clone() for n, p in self._trainable_named().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self._trainable_named()
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise KeyError(
                f"adapter state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def _trained_net(self) -> nn.Module:
        raise NotImplementedError

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """Context in which ``velocity`` is the pretrained model (LoRA off, or the frozen reference copy)."""
        if self.lora_config is not None:
            return peft_adapter_disabled(self._lora_root())
        if self._reference is not None:
            return self._reference_ctx()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _reference_ctx(self) -> Iterator[None]:
        prev, self._use_reference = self._use_reference, True
        try:
            yield
        finally:
            self._use_reference = prev

    def _net(self) -> nn.Module:
        return self._reference if (self._use_reference and self._reference is not None) else self._trained_net()

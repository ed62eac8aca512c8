"""LoRA linears computed as one matmul with the merged weight (``model.lora_forward``).

peft computes a LoRA linear as ``x W^T + s (x A^T) B^T``: the base matmul plus two thin ones, each a
separate kernel launch and, in training, four more thin products in the backward. Computing instead
``x (W + s B A)^T`` costs one ``out x r x in`` product to form the merged weight and then a single
matmul. On a small model whose hidden size is not much larger than the rank (the tiny SD3 of the speed
benchmark: hidden 128, rank 32) the thin products are a third of a targeted linear's work; on a large
model the saving is small but so is the cost.

The merged weight is formed inside a custom autograd function and *recomputed* in the backward rather
than kept, so training holds no full-size weight per layer beyond what peft's own path holds (the layer
input). Gradients: ``dW' = dy^T x``, ``dA = s B^T dW'``, ``dB = s dW' A^T`` (``dW'`` is never
stored beyond the layer's backward).

The result equals peft's to fp32 rounding, not bit for bit: both the rollout and training use the same
path, so the rollout's log-probs still equal a replay's exactly (``train.anchor=auto`` relies on that).
Layers the fused path does not cover (disabled adapters, several active adapters, dropout, DoRA and other
variants, inputs of another dtype) fall back to peft's own forward, call by call.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LORA_FORWARDS = ("auto", "merged", "separate")


class _MergedLinear(torch.autograd.Function):
    """``y = x (W + s B A)^T + b`` with the merged weight recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # noqa: D102
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        gx = gw = gbias = ga = gb = None
        if need_x:
            gx = grad_out @ torch.addmm(weight, lora_b, lora_a, alpha=s)
        if need_w or need_a or need_lb:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            g_merged = g2.T @ x2  # [out, in]
            if need_w:
                gw = g_merged
            if need_a:
                ga = (lora_b.T @ g_merged) * s
            if need_lb:
                gb = (g_merged @ lora_a.T) * s
        if need_b and ctx.has_bias:
            gbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return gx, gw, gbias, ga, gb, None


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft ``lora.Linear`` forward through :class:`_MergedLinear` when it is plain LoRA, else peft's."""
    base = self.base_layer
    active = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in getattr(self, "lora_variant", {})
        or not isinstance(self.lora_dropout[active[0]], nn.Identity)
        or not isinstance(base, nn.Linear)
    ):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if not (x.dtype == base.weight.dtype == a.dtype == b.dtype):
        return self._peft_forward(x, *args, **kwargs)
    return _MergedLinear.apply(x, base.weight, base.bias, a, b, float(self.scaling[name]))


def lora_layers(root: nn.Module) -> list[nn.Module]:
    """The peft LoRA linears under ``root``."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in root.modules() if isinstance(m, LoraLinear)]


def use_merged_lora_forward(root: nn.Module) -> int:
    """Route every peft LoRA linear under ``root`` through the merged-weight forward; the number of layers.
    Idempotent (a layer already routed is left as it is)."""
    n = 0
    for m in lora_layers(root):
        if not hasattr(m, "_peft_forward"):
            m._peft_forward = m.forward
            m.forward = types.MethodType(_fused_forward, m)
        n += 1
    return n


def resolve_lora_forward(mode: str, dtype: torch.dtype, sharding: str, world: int) -> str:
    """``merged`` or ``separate`` for ``model.lora_forward``. ``auto`` merges for fp32 weights (where peft's
    separate path and the merged one are both fp32 and the saving is pure) in one process or under DDP, and
    keeps peft's path where several processes shard the parameters: DeepSpeed's ZeRO gathers a parameter
    when its own module runs, and the merged forward reads the LoRA weights without running their modules
    (an explicit ``merged`` there is refused); under FSDP2 the merged path is untested (explicit only)."""
    if mode not in LORA_FORWARDS:
        raise ValueError(f"unknown model.lora_forward {mode!r}; valid: {', '.join(LORA_FORWARDS)}")
    zero_sharded = sharding == "deepspeed" and world > 1
    if mode == "merged" and zero_sharded:
        raise ValueError(
            "model.lora_forward=merged does not work with train.sharding=deepspeed on several processes "
            "(ZeRO gathers a LoRA weight only when its own module runs); use auto or separate"
        )
    if mode != "auto":
        return mode
    sharded = world > 1 and sharding in ("deepspeed", "fsdp2")
    return "separate" if dtype != torch.float32 or sharded else "merged"

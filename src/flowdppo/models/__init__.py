"""Model families behind one protocol (:class:`FlowModel`).

``build_model(cfg)`` picks the adapter by ``cfg.family``; each family module is imported only when
used, so the embedded model never pulls in transformers and real models never load on import.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowdppo.models.base import Cond, FlowModel, peft_adapter_disabled

# family -> "module:factory"; a factory takes the ModelConfig and returns a FlowModel
MODEL_FAMILIES: dict[str, str] = {
    "shapes": "flowdppo.models.shapes_model:build",
    "sd3": "flowdppo.models.sd3:build",
    "flux": "flowdppo.models.flux:build",
}


def build_model(cfg: Any) -> FlowModel:
    """Build the model named by ``cfg.family`` (a :class:`flowdppo.config.ModelConfig`)."""
    if cfg.family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {cfg.family!r}; valid: {', '.join(MODEL_FAMILIES)}")
    module, factory = MODEL_FAMILIES[cfg.family].split(":")
    return getattr(importlib.import_module(module), factory)(cfg)


__all__ = ["Cond", "FlowModel", "MODEL_FAMILIES", "build_model", "peft_adapter_disabled"]

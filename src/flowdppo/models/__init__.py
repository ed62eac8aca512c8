"""Model families behind one protocol (:class:`FlowModel`).

``build_model(cfg)`` picks the adapter by ``cfg.family``; each family module is imported only when
used, so the embedded model never pulls in transformers and real models never load on import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowdppo.models.base import Cond, FlowModel, peft_adapter_disabled
from flowdppo.registry import Registry

# family -> its factory, imported on first use ("module:factory"); a factory takes the ModelConfig (and
# ``model.args`` as keyword arguments) and returns a FlowModel. A config may also name any
# "package.module:factory" of its own.
MODEL_FAMILIES: Registry[Callable[..., FlowModel]] = Registry("model family", "model.family")
MODEL_FAMILIES.register("shapes", "flowdppo.models.shapes_model:build")
MODEL_FAMILIES.register("sd3", "flowdppo.models.sd3:build")
MODEL_FAMILIES.register("flux", "flowdppo.models.flux:build")


def build_model(cfg: Any) -> FlowModel:
    """Build the model named by ``cfg.family`` (a :class:`flowdppo.config.ModelConfig`)."""
    return MODEL_FAMILIES.get(cfg.family)(cfg, **dict(getattr(cfg, "args", {}) or {}))


__all__ = ["Cond", "FlowModel", "MODEL_FAMILIES", "build_model", "peft_adapter_disabled"]

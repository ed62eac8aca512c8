"""Components that live only in the test folder, registered by import path in a YAML config
(``model.family: custom_components:toy_family`` ...): the library's source knows nothing of them."""

from __future__ import annotations

import torch

from flowdppo.core.losses import LossInputs, LossSpec, TrustRegion, ratio_metrics
from toy import ToyModel, brightness_reward

CALLS = {"model": 0, "reward": 0, "loss": 0}


def toy_family(cfg, seed: int = 0) -> ToyModel:
    """A model-family factory: takes the ModelConfig and ``model.args``."""
    CALLS["model"] += 1
    return ToyModel(seed)


def scaled_brightness(scale: float = 1.0):
    """A reward factory: ``reward.args`` arrive as keyword arguments."""

    def fn(prompts, images):
        CALLS["reward"] += 1
        return {"lumen": scale * brightness_reward(prompts, images)["bright"]}

    return fn


def _capped_surrogate(inp: LossInputs, spec: LossSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """``-A * min(r, cap)``: a trust region of our own, with its knob in ``algorithm.loss_args``."""
    CALLS["loss"] += 1
    cap = float(spec.args["cap"])
    ratio = torch.exp(inp.log_ratio)
    loss = -inp.adv_bs() * torch.clamp(ratio, max=cap)
    m = ratio_metrics(ratio, inp.kl)
    m["capped_frac"] = float((ratio.detach() > cap).float().mean())
    return loss, m


CAPPED = TrustRegion(fn=_capped_surrogate, needs_reference=True)

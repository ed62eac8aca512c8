"""Stable Diffusion 3 / 3.5 (diffusers ``StableDiffusion3Pipeline``) behind the FlowModel protocol.

- **Prompts**: the pipeline's own ``encode_prompt`` (two CLIPs + T5, ``max_sequence_length`` T5
  tokens): ``prompt_embeds [B, 77 + L, D]`` and ``pooled_prompt_embeds [B, 2048]``.
- **Guidance**: true classifier-free guidance, as the pipeline: one batched call on
  ``[negative, positive]`` and ``v_u + g (v_c - v_u)`` when ``g > 1``; the negative prompt is ``""``.
- **Velocity**: ``transformer(x, timestep = 1000 * sigma, ...)`` on unpacked latents ``[B, 16, H/8, W/8]``.
- **Schedule**: the scheduler's static shift (3.0 for SD3.5), or its dynamic shift with the SD3
  pipeline's ``mu`` when the scheduler config asks for it.
- **Decoding**: ``vae.decode(x / scaling_factor + shift_factor)``.

Build with ``--set model.family=sd3 --set model.path=stabilityai/stable-diffusion-3.5-medium`` (or a
local diffusers folder).
"""

from __future__ import annotations

from typing import Any

import torch

from flowdppo.core import sde
from flowdppo.models.base import Cond, cfg_combine, torch_dtype
from flowdppo.models.diffusers_common import DiffusersFlowModel, load_pipeline


class SD3FlowModel(DiffusersFlowModel):
    family = "sd3"
    pipeline_cls_name = "StableDiffusion3Pipeline"

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        vsf, patch = self.pipe.vae_scale_factor, self.transformer.config.patch_size
        if resolution % (vsf * patch):
            raise ValueError(
                f"model.resolution={resolution} must be a multiple of {vsf * patch} for SD3 "
                f"(VAE factor {vsf} x patch {patch})"
            )
        return (int(self.transformer.config.in_channels), resolution // vsf, resolution // vsf)

    def _mu(self, num_steps: int) -> float | None:
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting"):
            return None
        _, h, w = self.latent_shape
        p = self.transformer.config.patch_size
        return sde.flux_mu(
            (h // p) * (w // p),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.16),
        )

    def _encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def uses_true_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """fp32 ``[B, C, H, W]``; with ``g > 1`` one batched call on ``[negative, positive]`` as the pipeline."""
        self._check_latents(x)
        b = x.shape[0]
        t = 1000.0 * sde.sigma_batch(sigma, b, self.device)  # the pipeline's scheduler.timesteps (fp32)
        dt = self._input_dtype
        h = x.to(self.device, dt)
        pe = cond["prompt_embeds"].to(self.device, dt)
        pooled = cond["pooled_prompt_embeds"].to(self.device, dt)
        if self.uses_true_cfg(guidance_scale):
            if "negative_prompt_embeds" in cond:
                npe = cond["negative_prompt_embeds"].to(self.device, dt)
                npooled = cond["negative_pooled_prompt_embeds"].to(self.device, dt)
            else:
                neg = self.encode_prompts([""])
                npe = neg["prompt_embeds"].to(self.device, dt).expand(b, -1, -1)
                npooled = neg["pooled_prompt_embeds"].to(self.device, dt).expand(b, -1)
            h, t = torch.cat([h, h]), torch.cat([t, t])
            pe, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])
        with self._compute_ctx():
            v = self._net()(
                hidden_states=h, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False
            )[0]
        v = v.float()
        if self.uses_true_cfg(guidance_scale):
            v_u, v_c = v.chunk(2)  # combined in fp32 (the pipeline combines in the network dtype)
            v = cfg_combine(v_u, v_c, guidance_scale)
        return v


def build(cfg: Any) -> SD3FlowModel:
    """The SD3 / SD3.5 adapter for a :class:`flowdppo.config.ModelConfig` (``cfg.path``: folder or hub id)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = load_pipeline(StableDiffusion3Pipeline, cfg.path, torch_dtype(cfg.dtype), "sd3")
    return SD3FlowModel(pipe, cfg)

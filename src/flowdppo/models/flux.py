"""FLUX.1 [dev] / [schnell] (diffusers ``FluxPipeline``) and FLUX.2 [klein] (``Flux2KleinPipeline``,
:class:`Flux2KleinFlowModel`) behind the FlowModel protocol; :func:`build` picks by the pipeline class.

FLUX.1:

- **Prompts**: the pipeline's own ``encode_prompt``: T5 ``prompt_embeds [B, L, 4096]`` and the CLIP
  ``pooled_prompt_embeds [B, 768]``; the text position ids are zeros and are rebuilt on each call.
- **Guidance**: FLUX.1-dev is guidance-distilled: ``guidance_scale`` is the value of its guidance
  embedding (``guidance = [g] * B``; 3.5 is the pipeline's default), one transformer pass. schnell has
  no guidance embedding and ignores it. (The pipeline's optional "true CFG" with a negative prompt is
  not used.)
- **Latents** stay unpacked ``[B, 16, H/8, W/8]`` outside; :meth:`FluxFlowModel.velocity` packs them
  into 2x2 patches ``[B, (H/16)(W/16), 64]`` with the image position ids, and unpacks the output.
- **Timestep**: the pipeline passes ``timestep / 1000`` (the transformer multiplies by 1000 again):
  ``(1000 * sigma).to(dtype) / 1000``, exactly as the pipeline rounds it.
- **Schedule**: the pipeline's base sigmas ``linspace(1, 1/N, N)`` through the scheduler's dynamic
  shift, ``mu`` from the packed image sequence length (``flowdppo.core.sde.flux_mu``).
- **Decoding**: ``vae.decode(x / scaling_factor + shift_factor)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flowdppo.core import sde
from flowdppo.models.base import Cond, cfg_combine, torch_dtype
from flowdppo.models.diffusers_common import DiffusersFlowModel, load_pipeline


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]`` (FLUX's 2x2 patch tokens, row-major)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C]`` -> ``[B, C, H, W]``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` of the packed image tokens: ``(0, row, col)``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFlowModel(DiffusersFlowModel):
    family = "flux"
    pipeline_cls_name = "FluxPipeline"

    def _text_encoder_names(self):
        return ("text_encoder", "text_encoder_2")

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        vsf = self.pipe.vae_scale_factor
        if resolution % (vsf * 2):
            raise ValueError(
                f"model.resolution={resolution} must be a multiple of {vsf * 2} for FLUX "
                f"(VAE factor {vsf} x 2x2 packing)"
            )
        side = 2 * (resolution // (vsf * 2))
        return (int(self.transformer.config.in_channels) // 4, side, side)

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def _mu(self, num_steps: int) -> float:
        c = self.scheduler_config
        _, h, w = self.latent_shape
        return sde.flux_mu(
            (h // 2) * (w // 2),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )

    def _base_sigmas(self, num_steps: int) -> Any:
        """``linspace(1, 1/N, N)``, what both FLUX pipelines pass to ``set_timesteps`` (unless the
        scheduler uses its own flow sigmas)."""
        if self.scheduler_config.get("use_flow_sigmas"):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def _encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """fp32 ``[B, C, H, W]``: one transformer pass on the packed latents (guidance embedding = ``g``)."""
        self._check_latents(x)
        b, _, h, w = x.shape
        dt = self._input_dtype
        t = (1000.0 * sde.sigma_batch(sigma, b, self.device)).to(dt) / 1000
        guidance = (
            torch.full((b,), float(guidance_scale), device=self.device, dtype=torch.float32)
            if self.has_guidance_embedding
            else None
        )
        pe = cond["prompt_embeds"].to(self.device, dt)
        pooled = cond["pooled_prompt_embeds"].to(self.device, dt)
        txt_ids = torch.zeros(pe.shape[1], 3, device=self.device, dtype=dt)
        with self._compute_ctx():
            out = self._net()(
                hidden_states=pack_latents(x.to(self.device, dt)),
                timestep=t,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=pe,
                txt_ids=txt_ids,
                img_ids=image_ids(h, w, self.device, dt),
                return_dict=False,
            )[0]
        return unpack_latents(out.float(), h, w)


class Flux2KleinFlowModel(DiffusersFlowModel):
    """FLUX.2 [klein] (diffusers ``Flux2KleinPipeline``): Qwen3 text encoder, 2x2-patchified latents.

    - **Latents** are the pipeline's own noise space, ``[B, 4C, H/16, W/16]`` (128 channels for the
      32-channel FLUX.2 VAE); ``velocity`` flattens them to tokens ``[B, HW/256, 4C]`` with 4-D position
      ids ``(t, h, w, l)``; text ids are ``(0, 0, 0, l)``.
    - **Guidance**: the base (non-distilled) model uses true CFG with the negative prompt ``""``, two
      transformer passes combined as ``v_u + g (v_c - v_u)`` when ``g > 1``; distilled checkpoints
      (``is_distilled`` in the pipeline config) ignore the scale. No guidance embedding.
    - **Schedule**: base sigmas ``linspace(1, 1/N, N)`` + the scheduler's dynamic shift with the
      pipeline's empirical ``mu(sequence length, N)`` (it depends on the number of steps).
    - **Decoding**: undo the VAE's batch-norm latent normalisation (``x * std + mean`` with its running
      statistics), unpatchify, ``vae.decode``.
    """

    family = "flux"
    pipeline_cls_name = "Flux2KleinPipeline"

    def _text_encoder_names(self):
        return ("text_encoder",)

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        vsf = self.pipe.vae_scale_factor
        if resolution % (vsf * 2):
            raise ValueError(
                f"model.resolution={resolution} must be a multiple of {vsf * 2} for FLUX.2 "
                f"(VAE factor {vsf} x 2x2 patches)"
            )
        side = resolution // (vsf * 2)
        return (int(self.transformer.config.in_channels), side, side)

    @property
    def is_distilled(self) -> bool:
        return bool(getattr(self.pipe.config, "is_distilled", False))

    def uses_true_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and not self.is_distilled

    def _mu(self, num_steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        _, h, w = self.latent_shape
        return compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)

    _base_sigmas = FluxFlowModel._base_sigmas  # the same pipeline sigmas as FLUX.1

    def _encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": pe}

    @staticmethod
    def _ids(b: int, t: int, h: int, w: int, l_: int, device: torch.device) -> torch.Tensor:
        ids = torch.cartesian_prod(torch.arange(t), torch.arange(h), torch.arange(w), torch.arange(l_))
        return ids.unsqueeze(0).expand(b, -1, -1).to(device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """fp32 ``[B, 4C, h, w]``; with true CFG a second pass on the negative prompt."""
        self._check_latents(x)
        b, c, h, w = x.shape
        dt = self._input_dtype
        t = (1000.0 * sde.sigma_batch(sigma, b, self.device)).to(dt) / 1000
        tokens = x.to(self.device, dt).reshape(b, c, h * w).permute(0, 2, 1)
        img_ids = self._ids(b, 1, h, w, 1, self.device)
        net = self._net()

        def call(pe: torch.Tensor) -> torch.Tensor:
            with self._compute_ctx():
                out = net(
                    hidden_states=tokens,
                    timestep=t,
                    guidance=None,
                    encoder_hidden_states=pe,
                    txt_ids=self._ids(b, 1, 1, 1, pe.shape[1], self.device),
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
            return out[:, : h * w].float()

        v = call(cond["prompt_embeds"].to(self.device, dt))
        if self.uses_true_cfg(guidance_scale):
            if "negative_prompt_embeds" in cond:
                npe = cond["negative_prompt_embeds"].to(self.device, dt)
            else:
                npe = self.encode_prompts([""])["prompt_embeds"].to(self.device, dt).expand(b, -1, -1)
            v_u = call(npe)
            v = cfg_combine(v_u, v, guidance_scale)
        return v.permute(0, 2, 1).reshape(b, c, h, w)

    def _vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(x.device, x.dtype)
        x = x * std + mean
        b, c, h, w = x.shape  # unpatchify 2x2: [B, 4C, h, w] -> [B, C, 2h, 2w]
        return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def pipeline_class_name(path: str) -> str | None:
    """``_class_name`` of the pipeline at ``path`` (its ``model_index.json``; a hub id reads the cache or the hub)."""
    import json
    from pathlib import Path

    index = Path(path) / "model_index.json"
    if index.exists():
        return json.loads(index.read_text()).get("_class_name")
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path).get("_class_name")
    except Exception:  # noqa: BLE001 - let from_pretrained raise the informative error
        return None


def build(cfg: Any) -> DiffusersFlowModel:
    """The FLUX adapter for a :class:`flowdppo.config.ModelConfig` (``cfg.path``: folder or hub id):
    FLUX.1 [dev]/[schnell] (``FluxPipeline``) or FLUX.2 [klein] (``Flux2KleinPipeline``), chosen by the
    pipeline's ``model_index.json``."""
    import diffusers

    name = pipeline_class_name(cfg.path) if cfg.path else None
    if name == "Flux2KleinPipeline":
        pipe = load_pipeline(diffusers.Flux2KleinPipeline, cfg.path, torch_dtype(cfg.dtype), "flux")
        return Flux2KleinFlowModel(pipe, cfg)
    if name not in (None, "FluxPipeline"):
        raise ValueError(
            f"model.family=flux supports FluxPipeline (FLUX.1 dev/schnell) and Flux2KleinPipeline "
            f"(FLUX.2 klein); {cfg.path!r} is a {name}"
        )
    pipe = load_pipeline(diffusers.FluxPipeline, cfg.path, torch_dtype(cfg.dtype), "flux")
    return FluxFlowModel(pipe, cfg)

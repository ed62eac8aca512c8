"""The embedded model: a tiny text-conditioned SD3 transformer over the 32x32 shapes world.

:class:`ShapesFlowModel` implements :class:`flowdppo.models.base.FlowModel` for a small model that
ships with the package (``flowdppo/assets/shapes_model/``), so every part of the RL loop runs on a
CPU in minutes with the same code paths as a real SD3:

- **Text encoder** (:class:`WordEncoder`): word-level tokens over the shapes world's vocabulary
  (``[PAD]`` = 0, ``[UNK]`` = 1), a learned position embedding and a couple of pre-norm transformer
  encoder layers. Padded positions are zeroed in ``encoder_hidden_states [B, L, D]``;
  ``pooled_projections [B, D]`` is the masked mean of the token states (zero for the empty prompt,
  the unconditional embedding of classifier-free guidance).
- **Transformer**: diffusers' ``SD3Transformer2DModel`` in *pixel space* (3 channels, 32x32,
  patch 4 -> 64 image tokens), so LoRA targets, joint attention and the time conditioning are those
  of the real SD3. It is called with ``timestep = 1000 * sigma``.
- **Latents** are pixels scaled to ``[-1, 1]``: ``decode(x) = ((x + 1) / 2).clamp(0, 1)``.
- **Schedule**: ``"uniform-shift"`` with shift 1 (plain ``linspace(1, 0, N+1)``) is the default
  (``"model"``): the model is small, in pixel space at 32x32, where no resolution shift is needed.
- **LoRA** through peft on the transformer (``add_lora``); the base weights and the text encoder
  stay frozen and :meth:`ShapesFlowModel.disable_adapter` gives back the reference model exactly.

Build it with :meth:`ShapesFlowModel.from_pretrained` (the shipped weights, no download) or
:meth:`ShapesFlowModel.from_config` (random weights, for tests and for :mod:`flowdppo.tools.pretrain`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowdppo.core import sde
from flowdppo.models.base import AdapterMixin, Cond, cfg_combine, torch_dtype

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes_model"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

PAD, UNK = "[PAD]", "[UNK]"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

# The default architecture (what the shipped weights use; see models/README.md for why).
DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 32,
    "channels": 3,
    "patch_size": 4,
    "num_layers": 4,
    "num_heads": 3,
    "head_dim": 32,
    "qk_norm": "rms_norm",
    "text_dim": 64,
    "text_layers": 2,
    "text_heads": 4,
    "max_tokens": 10,
    # init of the learned position embedding: "sinusoidal" = sin/cos codes at the token embeddings' scale
    # (word order visible from the first step); "small" = N(0, 0.02), which the first shipped model used and
    # which left it reading prompts as bags of words (its positions ended 6x smaller than its tokens)
    "text_pos_init": "sinusoidal",
    "default_shift": 1.0,
    "vocab": None,  # None = flowdppo.worlds.shapes.vocabulary() at build time; stored in config.json
}

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words (punctuation dropped)."""
    return _WORD.findall(text.lower())


def position_codes(n: int, dim: int, init: str = "sinusoidal") -> torch.Tensor:
    """Initial position embedding ``[n, dim]``.

    ``"sinusoidal"``: the transformer's sin/cos codes scaled to unit variance per entry, i.e. the scale
    of ``nn.Embedding``'s N(0, 1) token rows, so that after the first LayerNorm word order weighs as much
    as word identity. ``"small"``: N(0, 0.02) (the first shipped model's init)."""
    if init == "small":
        return torch.randn(n, dim) * 0.02
    if init != "sinusoidal":
        raise ValueError(f"unknown text_pos_init {init!r}; valid: sinusoidal, small")
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    out = torch.zeros(n, dim)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out * math.sqrt(2.0)


class WordEncoder(nn.Module):
    """Word-level text encoder: ``[B]`` prompts -> ``([B, L, D], [B, D])``.

    Token ids are built by :meth:`ids`; id 0 is padding (masked in attention, zeroed in the output),
    id 1 is an unknown word. Prompts longer than ``max_tokens`` words are truncated.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_tokens: int = 12,
        pos_init: str = "sinusoidal",
    ):
        super().__init__()
        self.vocab = [PAD, UNK] + [w for w in vocab if w not in (PAD, UNK)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens
        self.tok = nn.Embedding(len(self.vocab), dim)  # N(0, 1): rows of norm ~sqrt(dim)
        self.pos = nn.Parameter(position_codes(max_tokens, dim, pos_init))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_tokens]`` (long), 0-padded."""
        out = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.index.get(w, 1) for w in tokenize(p)][: self.max_tokens]
            if toks:
                out[i, : len(toks)] = torch.tensor(toks)
        return out

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != 0  # [B, L] True = real token
        h = self.tok(ids) + self.pos[None, : ids.shape[1]]
        # a fully padded row (the empty prompt) would make attention all -inf: let it attend to itself
        key_pad = ~mask
        key_pad = key_pad & mask.any(dim=1, keepdim=True)
        h = self.layers(h, src_key_padding_mask=key_pad)
        h = self.norm(h) * mask[..., None]  # [B, L, D], pads = 0
        n = mask.sum(dim=1, keepdim=True).clamp(min=1)
        pooled = h.sum(dim=1) / n  # [B, D], empty prompt = 0
        return h, pooled


class ShapesNet(nn.Module):
    """Every parameter of the shapes model: ``text_encoder`` + ``transformer`` (+ LoRA once added)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.text_encoder = WordEncoder(
            cfg["vocab"],
            cfg["text_dim"],
            cfg["text_layers"],
            cfg["text_heads"],
            cfg["max_tokens"],
            cfg["text_pos_init"],
        )
        inner = cfg["num_heads"] * cfg["head_dim"]
        self.transformer = SD3Transformer2DModel(
            sample_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["channels"],
            out_channels=cfg["channels"],
            num_layers=cfg["num_layers"],
            attention_head_dim=cfg["head_dim"],
            num_attention_heads=cfg["num_heads"],
            joint_attention_dim=cfg["text_dim"],
            caption_projection_dim=inner,
            pooled_projection_dim=cfg["text_dim"],
            pos_embed_max_size=cfg["image_size"] // cfg["patch_size"],
            qk_norm=cfg["qk_norm"],
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ehs: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` at flow time ``sigma [B]`` (the network sees ``1000 * sigma``)."""
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=1000.0 * sigma,
            return_dict=False,
        )[0]


def _resolve_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(DEFAULT_CONFIG)
    out.update(cfg or {})
    unknown = set(out) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown shapes model config keys: {sorted(unknown)}")
    if out["vocab"] is None:
        from flowdppo.worlds import shapes

        out["vocab"] = list(shapes.vocabulary())
    return out


class ShapesFlowModel(AdapterMixin):
    """The embedded shapes model behind the :class:`~flowdppo.models.base.FlowModel` protocol."""

    def __init__(
        self,
        net: ShapesNet,
        config: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.config = config
        self.module: nn.Module = net
        self.device = torch.device(device)
        self.dtype = dtype
        self.module.to(self.device, dtype)
        c, s = config["channels"], config["image_size"]
        self.latent_shape: tuple[int, int, int] = (c, s, s)
        self.lora_config: dict[str, Any] | None = None
        self._reference: ShapesNet | None = None  # frozen copy for full fine-tuning
        self._use_reference = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(
        cls,
        cfg: dict[str, Any] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ShapesFlowModel:
        """Random weights (seeded) for the architecture ``cfg`` (keys of ``DEFAULT_CONFIG``; missing = default)."""
        cfg = _resolve_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ShapesNet(cfg)
        return cls(net, cfg, device, dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ShapesFlowModel:
        """Load ``config.json`` + ``model.safetensors`` from ``path`` (default: the shipped weights)."""
        from safetensors.torch import load_file

        path = Path(path) if path is not None else ASSET_DIR
        cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_file.exists() or not w_file.exists():
            raise FileNotFoundError(
                f"no shapes model at {path} (need {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "train one with `python -m flowdppo.tools.pretrain --out DIR`"
            )
        cfg = _resolve_config(json.loads(cfg_file.read_text())["model"])
        net = ShapesNet(cfg)
        state = {k: v.float() for k, v in load_file(str(w_file)).items()}
        net.load_state_dict(state, strict=True)
        return cls(net, cfg, device, dtype)

    def save_pretrained(
        self, directory: str | os.PathLike, extra: dict[str, Any] | None = None, half: bool = True
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` (base weights; fp16 by default, ~half the size)."""
        from safetensors.torch import save_file

        if self.lora_config is not None:
            raise RuntimeError("save_pretrained saves base weights; use save_adapter for a LoRA model")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dt = torch.float16 if half else torch.float32
        state = {k: v.detach().to("cpu", dt).contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME))
        meta = {"format": "flowdppo-shapes-model", "model": self.config, **(extra or {})}
        (d / CONFIG_NAME).write_text(json.dumps(meta, indent=1))

    # ---------------------------------------------------------------- adapters
    def add_lora(
        self,
        rank: int = 16,
        alpha: float = 32.0,
        target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        dropout: float = 0.0,
    ) -> None:
        """Add a peft LoRA adapter (B = 0 at init) to the transformer; freeze everything else."""
        from peft import LoraConfig

        if self.lora_config is not None:
            raise RuntimeError("the model already has a LoRA adapter")
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.transformer.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                target_modules=list(target_modules),
                init_lora_weights=True,
            )
        )
        for n, p in self.module.named_parameters():
            p.requires_grad_("lora_" in n)
        self.module.to(self.device, self.dtype)
        self.lora_config = {"rank": rank, "alpha": alpha, "target_modules": list(target_modules), "dropout": dropout}

    def enable_full_finetune(self) -> None:
        """Train every transformer weight; keep a frozen copy as the reference for :meth:`disable_adapter`."""
        if self.lora_config is not None:
            raise RuntimeError("full fine-tuning and a LoRA adapter are exclusive")
        self._reference = copy.deepcopy(self.module).eval()
        for p in self._reference.parameters():
            p.requires_grad_(False)
        for p in self.module.text_encoder.parameters():
            p.requires_grad_(False)
        for p in self.module.transformer.parameters():
            p.requires_grad_(True)

    def _lora_root(self) -> nn.Module:
        return self.module

    def _trained_net(self) -> nn.Module:
        return self.module

    def _trainable_named(self) -> dict[str, nn.Parameter]:
        if self.lora_config is not None:
            return {n: p for n, p in self.module.named_parameters() if "lora_" in n}
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """``adapter_model.safetensors`` (the trainable weights) + ``adapter_config.json``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.to("cpu", torch.float32).contiguous() for k, v in self.adapter_state_dict().items()}
        save_file(state, str(d / ADAPTER_WEIGHTS_NAME))
        meta = {
            "format": "flowdppo-shapes-adapter",
            "kind": "lora" if self.lora_config else "full",
            "lora": self.lora_config,
            "model": self.config,
        }
        (d / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=1))

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load what :meth:`save_adapter` wrote (adds the LoRA adapter first if the model has none)."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
        if meta.get("kind") == "lora" and self.lora_config is None:
            lc = meta["lora"]
            self.add_lora(lc["rank"], lc["alpha"], lc["target_modules"], lc.get("dropout", 0.0))
        elif meta.get("kind") == "full" and self.lora_config is None and self._reference is None:
            self.enable_full_finetune()
        self.load_adapter_state_dict(load_file(str(d / ADAPTER_WEIGHTS_NAME)))

    # ---------------------------------------------------------------- the protocol
    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.module.text_encoder.ids(prompts).to(self.device)
        ehs, pooled = self.module.text_encoder(ids)
        return ehs.to(self.dtype), pooled.to(self.dtype)

    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float = 1.0) -> Cond:
        """``encoder_hidden_states [B, L, D]``, ``pooled_projections [B, D]`` (+ ``uncond_*`` when scale > 1).

        The text encoder is frozen during RL, so this runs without gradient.
        """
        prompts = list(prompts)
        with torch.no_grad():
            ehs, pooled = self._encode(prompts)
            t = {"encoder_hidden_states": ehs, "pooled_projections": pooled}
            if guidance_scale > 1.0:
                u_ehs, u_pooled = self._encode([""])
                t["uncond_encoder_hidden_states"] = u_ehs.expand(len(prompts), -1, -1).clone()
                t["uncond_pooled_projections"] = u_pooled.expand(len(prompts), -1).clone()
        return Cond(t)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """float32 ``[B, C, H, W]``; CFG ``v_u + g (v_c - v_u)`` in one batched call when ``g > 1``."""
        b = x.shape[0]
        sigma = sde.sigma_batch(sigma, b, self.device)
        x = x.to(self.device, self.dtype)
        ehs = cond["encoder_hidden_states"].to(self.device, self.dtype)
        pooled = cond["pooled_projections"].to(self.device, self.dtype)
        net = self._net()
        if guidance_scale == 1.0:
            return net(x, sigma, ehs, pooled).float()
        if "uncond_encoder_hidden_states" in cond:
            u_ehs = cond["uncond_encoder_hidden_states"].to(self.device, self.dtype)
            u_pooled = cond["uncond_pooled_projections"].to(self.device, self.dtype)
        else:
            with torch.no_grad():
                u_ehs, u_pooled = self._encode([""])
            u_ehs, u_pooled = u_ehs.expand(b, -1, -1), u_pooled.expand(b, -1)
        v = net(
            torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([u_ehs, ehs]), torch.cat([u_pooled, pooled])
        ).float()
        v_u, v_c = v.chunk(2)
        return cfg_combine(v_u, v_c, guidance_scale)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels: ``((x + 1) / 2).clamp(0, 1)``, float32 ``[B, 3, 32, 32]``."""
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def sigmas(self, num_steps: int, schedule: str = "model", shift: float | None = None) -> torch.Tensor:
        """``[num_steps + 1]`` fp32, 1 -> 0.

        ``"model"`` and ``"uniform-shift"`` give the SD3 shift ``s t / (1 + (s-1) t)`` of
        ``linspace(1, 0, N+1)`` with ``s = shift`` (default: the model's ``default_shift``, 1.0 = linear);
        ``"diffusers"`` gives what a ``FlowMatchEulerDiscreteScheduler(shift=s)`` would.
        """
        s = float(self.config["default_shift"] if shift is None else shift)
        if schedule in ("model", "uniform-shift"):
            return sde.uniform_shift_sigmas(num_steps, s)
        if schedule == "diffusers":
            return sde.diffusers_sigmas(num_steps, {"shift": s})
        raise ValueError(f"unknown schedule {schedule!r}; valid: model, uniform-shift, diffusers")

    # ---------------------------------------------------------------- helpers
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        num_steps: int = 10,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        schedule: str = "model",
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Euler ODE samples (the sampler of :func:`flowdppo.training.rollout.ode_sample`), images
        ``[B, 3, 32, 32]`` in ``[0, 1]``; initial noise from ``generator``, ``batch_size`` at a time."""
        from flowdppo.training.rollout import ode_sample

        sig = self.sigmas(num_steps, schedule)
        out = []
        prompts = list(prompts)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            cond = self.encode_prompts(chunk, guidance_scale)
            x = torch.randn((len(chunk), *self.latent_shape), generator=generator).to(self.device)
            out.append(self.decode(ode_sample(self, cond, sig, x, guidance_scale)).cpu())
        return torch.cat(out)


def build(cfg: Any) -> ShapesFlowModel:
    """Factory for :func:`flowdppo.models.build_model` (a :class:`flowdppo.config.ModelConfig`).

    Loads ``cfg.path`` (None = the shipped weights), then adds a LoRA adapter (``cfg.lora``) or
    switches to full fine-tuning with a frozen reference copy.
    """
    dtype = torch_dtype(getattr(cfg, "dtype", "float32"))
    model = ShapesFlowModel.from_pretrained(
        getattr(cfg, "path", None), device=getattr(cfg, "device", "cpu"), dtype=dtype
    )
    if getattr(cfg, "lora", True):
        try:
            model.add_lora(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
        except ValueError as e:
            if "not found" not in str(e):
                raise
            from flowdppo.config import ConfigError

            raise ConfigError(
                f"model.lora_targets {list(cfg.lora_targets)} matched no module of the shapes model; "
                f"valid: module names such as {', '.join(DEFAULT_LORA_TARGETS)}"
            ) from None
    else:
        model.enable_full_finetune()
    return model


__all__ = [
    "ShapesFlowModel",
    "ShapesNet",
    "WordEncoder",
    "DEFAULT_CONFIG",
    "DEFAULT_LORA_TARGETS",
    "ASSET_DIR",
    "build",
    "tokenize",
]

"""Learned rewards on CLIP-family models (transformers ``CLIPModel``): PickScore, CLIP score, the LAION
aesthetic predictor and HPSv2.1.

Each scorer is batched (``batch_size`` images per forward), runs on ``device`` (default: CUDA when
available) in ``dtype`` (default float16 on CUDA, float32 on CPU), and loads weights with
``from_pretrained`` from a hub id or a local folder. Images are preprocessed as tensors on the
device with the processor's own settings (resize the short side with bicubic+antialias, centre crop,
normalise), so a batch never goes through PIL. Identical prompts in a batch (a GRPO group) are
encoded once.

Needs ``transformers`` (``pip install "flowdppo[rewards]"``).
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

EXTRA_HINT = 'pip install "flowdppo[rewards]"'


class MissingDependency(ImportError):
    """A reward's optional dependency is not installed (the message names the extra)."""


def require(*modules: str) -> None:
    """Fail at construction, with one line naming the extra, when an optional dependency is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"this reward needs {', '.join(missing)}: {EXTRA_HINT}")


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_model(key: tuple, load):
    """One loaded model per ``key`` (weights, device, dtype) while any scorer holds it: components that
    load the same weights share them."""
    model = _SHARED.get(key)
    if model is None:
        model = load()
        _SHARED[key] = model
    return model


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"reward device {device!r}: CUDA is not available here; use device=cpu")
    if dev.type == "cuda" and dev.index is None:  # this process's GPU (torchrun sets it per rank), fixed now
        dev = torch.device("cuda", torch.cuda.current_device())
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is None:
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise ValueError(f"reward dtype {dtype!r}: valid: {', '.join(names)}")
    return dev, dt


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _size(v, key: str) -> int | tuple[int, int]:
    if isinstance(v, int):
        return v
    v = dict(v)
    if "shortest_edge" in v:
        return int(v["shortest_edge"])
    return int(v["height"]), int(v["width"])


class ImageTransform:
    """The CLIP image processor's resize / centre-crop / normalise, as a batched tensor operation."""

    def __init__(self, processor):
        self.resize = _size(processor.size, "size") if getattr(processor, "do_resize", True) else None
        crop = getattr(processor, "crop_size", None)
        self.crop = (
            _size(crop, "crop_size") if crop is not None and getattr(processor, "do_center_crop", True) else None
        )
        if isinstance(self.crop, int):
            self.crop = (self.crop, self.crop)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.crop is not None:
            return self.crop
        return (self.resize, self.resize) if isinstance(self.resize, int) else self.resize

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] (any device) -> normalised pixels on the same device, float32."""
        x = images.float().clamp(0, 1)
        h, w = x.shape[-2:]
        if self.resize is not None:
            if isinstance(self.resize, int):
                short, long = (h, w) if h <= w else (w, h)
                new_short, new_long = self.resize, int(self.resize * long / short)
                size = (new_short, new_long) if h <= w else (new_long, new_short)
            else:
                size = self.resize
            if tuple(size) != (h, w):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if h < ch or w < cw:  # as the processor: pad, then crop
                x = F.pad(
                    x, ((max(cw - w, 0) + 1) // 2, max(cw - w, 0) // 2, (max(ch - h, 0) + 1) // 2, max(ch - h, 0) // 2)
                )
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class CLIPScorer:
    """A transformers ``CLIPModel`` + its tokenizer and image settings; the base of the scorers below.

    ``model``: hub id or folder of a ``CLIPModel`` checkpoint; ``processor``: hub id or folder holding
    the tokenizer and ``preprocessor_config.json`` (defaults to ``model``).
    """

    default_model: str = ""
    default_processor: str | None = None
    component: str = "clip"

    def __init__(
        self,
        model: str | None = None,
        processor: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 32,
    ):
        require("transformers")
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device, self.dtype = resolve_device_dtype(device, dtype)
        model = model or self.default_model
        processor = processor or self.default_processor or model
        self.model = shared_model(
            ("clip", model, str(self.device), str(self.dtype)),
            lambda: CLIPModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval(),
        )
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        self.transform = ImageTransform(AutoImageProcessor.from_pretrained(processor))
        self.max_length = min(77, int(getattr(self.model.config.text_config, "max_position_embeddings", 77)))
        if batch_size < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.components = (self.component,)
        self.image_size = self.transform.image_size

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[B, D]`` (float32)."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            px = self.transform(images[i : i + self.batch_size].to(self.device)).to(self.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=px)).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[B, D]``; each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        out = []
        for i in range(0, len(unique), self.batch_size):
            tok = self.tokenizer(
                unique[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out.append(_features(self.model.get_text_features(**tok)).float())
        emb = F.normalize(torch.cat(out), dim=-1)
        index = {p: j for j, p in enumerate(unique)}
        return emb[torch.tensor([index[p] for p in prompts], device=emb.device)]

    def cosine(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)

    def score(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.component: self.score(prompts, images).float().cpu()}


class PickScore(CLIPScorer):
    """``pickscore = exp(logit_scale) * cos(image, text) / 26``.

    PickScore_v1 (``yuvalkirstain/PickScore_v1``, a CLIP-H fine-tuned on Pick-a-Pic) with the
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor; the division by 26 is flow_grpo's (and
    Flow-Factory's) scale, which puts typical scores near 0.8-0.9.
    """

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    component = "pickscore"

    def __init__(self, *args, scale: float = 26.0, **kw):
        super().__init__(*args, **kw)
        self.scale = float(scale)

    def score(self, prompts, images):
        return self.model.logit_scale.float().exp() * self.cosine(prompts, images) / self.scale


class CLIPScore(CLIPScorer):
    """``clipscore = exp(logit_scale) * cos(image, text) / 30`` on ``openai/clip-vit-large-patch14``.

    flow_grpo's ``clip_score`` (``logits_per_image / 30``; CLIP-L's ``exp(logit_scale)`` is 100, so
    this is ``cos * 10 / 3``). ``scale=`` changes the divisor.
    """

    default_model = "openai/clip-vit-large-patch14"
    component = "clipscore"

    def __init__(self, *args, scale: float = 30.0, **kw):
        super().__init__(*args, **kw)
        self.scale = float(scale)

    def score(self, prompts, images):
        return self.model.logit_scale.float().exp() * self.cosine(prompts, images) / self.scale


class HPSv2(CLIPScorer):
    """``hpsv2 = cos(image, text)`` of HPSv2.1 (a CLIP ViT-H-14 fine-tuned on HPDv2).

    HPSv2's own ``score`` and flow_grpo / DanceGRPO use the raw cosine of the normalised features
    (no logit scale); typical values are 0.2-0.35. ``model`` must be a transformers
    ``CLIPModel``-format folder or hub id of HPSv2.1 (the original ``HPS_v2.1_compressed.pt`` is an
    open_clip checkpoint; convert it to ``CLIPModel`` format first); the tokenizer and image
    settings are those of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (HPSv2's base model).
    """

    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    component = "hpsv2"

    def __init__(self, model: str | None = None, *args, **kw):
        if not model:
            raise ValueError("hpsv2 needs model=<hub id or folder of HPSv2.1 in transformers CLIPModel format>")
        super().__init__(model, *args, **kw)

    def score(self, prompts, images):
        return self.cosine(prompts, images)


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations
    (its dropouts are inactive at inference); state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"aesthetic head: no file at {path!r} (sac+logos+ava1-l14-linearMSE.pth or a .safetensors)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise ValueError(f"aesthetic head {path!r}: cannot load ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return sd


class Aesthetic(CLIPScorer):
    """``aesthetic = MLP(normalised CLIP-L image embedding)``: the LAION aesthetic predictor v2
    (``sac+logos+ava1-l14-linearMSE.pth``) on ``openai/clip-vit-large-patch14``, on its 1-10 scale
    unchanged, as DDPO and flow_grpo. ``head`` is the path of the MLP's weights (.pth or .safetensors).
    Prompt-free."""

    default_model = "openai/clip-vit-large-patch14"
    component = "aesthetic"

    def __init__(self, head: str | None = None, model: str | None = None, *args, **kw):
        if not head:
            raise ValueError("aesthetic needs head=<path of sac+logos+ava1-l14-linearMSE.pth>")
        super().__init__(model, *args, **kw)
        sd = load_state_dict(head)
        dim = int(self.model.config.projection_dim)
        self.head = AestheticHead(dim)
        try:
            self.head.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"aesthetic head {head!r} does not fit the {dim}-dim MLP: {first}") from None
        self.head = self.head.to(self.device, self.dtype).eval()

    @torch.no_grad()
    def score(self, prompts, images):
        emb = self.image_embeds(images)
        return self.head(emb.to(self.dtype)).float().squeeze(-1)

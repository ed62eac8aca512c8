"""JPEG compressibility, the reward of DDPO and flow_grpo (``jpeg_compressibility``)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch


def jpeg_sizes(images: torch.Tensor, quality: int = 95) -> list[int]:
    """Bytes of each image saved by PIL as JPEG at ``quality`` (uint8-rounded like every peer)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return sizes


class JPEGCompressibility:
    """``jpeg = -(JPEG bytes / 1000) / scale``: smaller files score higher.

    Matches flow_grpo's ``jpeg_compressibility`` with the default ``scale=500`` and ``quality=95``
    (DDPO's is ``scale=1``: minus the size in kB). Prompt-free; runs on the CPU (PIL).
    """

    components = ("jpeg",)

    def __init__(self, quality: int = 95, scale: float = 500.0):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg: quality must be in 1..100, got {quality}")
        if not scale > 0:
            raise ValueError(f"jpeg: scale must be positive, got {scale}")
        self.quality, self.scale = int(quality), float(scale)

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = torch.tensor(jpeg_sizes(images, self.quality), dtype=torch.float32)
        return {"jpeg": -(sizes / 1000.0) / self.scale}
